#include "pipeline/stage_cache.h"

#include <chrono>
#include <ctime>
#include <filesystem>
#include <functional>
#include <system_error>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "mdd/io/safetensors.h"
#include "mdd/util/error.h"
#include "util/file_util.h"
#include "util/json_preview.h"

namespace fs = std::filesystem;

namespace mdd::detail {
namespace {

// The settings that differ between two stage signatures, as "key: old -> new" (at most five, values
// shortened), so a user whose checkpoints were set aside sees why, e.g. that a newer mdd added a key
// ("codec_identity: (absent) -> ...") rather than that they changed a setting. "" if unparsable.
std::string signature_changes(const std::string& recorded, const std::string& current) {
  using nlohmann::json;
  const json a = json::parse(recorded, nullptr, /*allow_exceptions=*/false);
  const json b = json::parse(current, nullptr, /*allow_exceptions=*/false);
  if (!a.is_object() || !b.is_object()) return "";
  std::vector<std::string> changes;
  auto show = [](const json* v) { return v ? json_preview(*v, 40) : std::string("(absent)"); };
  // Depth 2: signatures nest one config section (e.g. "finetune": {...}) below the top level.
  std::function<void(const json&, const json&, const std::string&, int)> walk = [&](const json& x, const json& y,
                                                                                   const std::string& prefix, int depth) {
    std::vector<std::string> keys;
    for (auto it = x.begin(); it != x.end(); ++it) keys.push_back(it.key());
    for (auto it = y.begin(); it != y.end(); ++it)
      if (!x.contains(it.key())) keys.push_back(it.key());
    for (const auto& k : keys) {
      const json* xv = x.contains(k) ? &x.at(k) : nullptr;
      const json* yv = y.contains(k) ? &y.at(k) : nullptr;
      if (xv && yv && *xv == *yv) continue;
      if (xv && yv && xv->is_object() && yv->is_object() && depth < 2) {
        walk(*xv, *yv, prefix + k + ".", depth + 1);
      } else {
        changes.push_back(prefix + k + ": " + show(xv) + " -> " + show(yv));
      }
    }
  };
  walk(a, b, "", 1);
  std::string out;
  for (size_t i = 0; i < changes.size() && i < 5; ++i) out += (i ? "; " : "") + changes[i];
  if (changes.size() > 5) out += fmt::format("; and {} more", changes.size() - 5);
  return out;
}

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
    std::string whose = "a run without a signature file";
    if (force) {
      whose = "the run being redone (--force)";
    } else if (have_sig) {
      const std::string changes = signature_changes(recorded, resume_signature);
      whose = "a run with other settings" + (changes.empty() ? "" : " (" + changes + ")");
    }
    say(log, fmt::format("{}: checkpoints of {} moved to {} (delete that folder when it is no longer needed)",
                         root.filename().string(), whose, target.string()));
  }
  write_text_file_atomic(sig_path.string(), resume_signature);
}

}  // namespace mdd::detail
