#include "pipeline/stage_cache.h"

#include <chrono>
#include <ctime>
#include <filesystem>
#include <system_error>

#include <fmt/format.h>

#include "mdd/io/safetensors.h"
#include "mdd/util/error.h"
#include "util/file_util.h"

namespace fs = std::filesystem;

namespace mdd::detail {
namespace {

void say(const LogFn& log, const std::string& line) {
  if (log) log(line);
}

std::string utc_stamp() {
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  ::gmtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y%m%d-%H%M%S", &tm);
  return buf;
}

bool non_empty_dir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec) && !fs::is_empty(p, ec);
}

}  // namespace

std::optional<io::SafeTensors> load_stage_output(const std::string& path, const std::string& signature,
                                                 const LogFn& log) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return std::nullopt;
  try {
    // Fully validated (a half-written or corrupt output must not count as done).
    auto st = io::load_safetensors(path);
    const auto it = st.metadata.find("signature");
    if (it == st.metadata.end() || it->second != signature) return std::nullopt;
    return st;
  } catch (const Error& e) {
    say(log, fmt::format("cannot reuse {} ({}); computing it again", path, e.what()));
    return std::nullopt;
  }
}

void prepare_stage_checkpoints(const std::string& dir, const std::string& resume_signature, bool force,
                               const LogFn& log) {
  const fs::path root(dir), sig_path = root / "signature.json", ckpt = root / "checkpoints";
  std::error_code ec;
  const bool have_sig = fs::exists(sig_path, ec);
  std::string recorded;
  if (have_sig) {
    try {
      recorded = read_text_file(sig_path.string(), uint64_t(16) << 20);
    } catch (const Error& e) {
      throw Error(fmt::format("{} exists but cannot be read ({}); its checkpoints are left untouched — fix or remove "
                              "the file and run again", sig_path.string(), e.what()));
    }
    if (!force && recorded == resume_signature) return;
  }
  if (non_empty_dir(ckpt)) {
    const fs::path aside = root / "superseded" / (utc_stamp() + "-checkpoints");
    fs::create_directories(aside.parent_path(), ec);
    fs::path target = aside;
    for (int i = 1; fs::exists(target, ec); ++i) target = aside.string() + "-" + std::to_string(i);
    fs::rename(ckpt, target, ec);
    if (ec)
      throw Error(fmt::format("cannot move the superseded checkpoints {} to {} ({})", ckpt.string(), target.string(),
                              ec.message()));
    say(log, fmt::format("{}: checkpoints of {} moved to {} (delete that folder when it is no longer needed)",
                         root.filename().string(),
                         force ? "the run being redone (--force)"
                               : have_sig ? "a run with other settings" : "a run without a signature file",
                         target.string()));
  }
  write_text_file_atomic(sig_path.string(), resume_signature);
}

}  // namespace mdd::detail
