#include "mdd/train/checkpoint.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <system_error>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "mdd/io/torch_checkpoint.h"
#include "mdd/io/weight_entry.h"
#include "mdd/util/error.h"
#include "util/file_util.h"
#include "util/json_preview.h"

namespace fs = std::filesystem;

namespace mdd {
namespace {

// Parses "<digits>.json" -> step, or -1.
int64_t step_of(const std::string& filename) {
  if (filename.size() < 6 || filename.compare(filename.size() - 5, 5, ".json") != 0) return -1;
  const std::string digits = filename.substr(0, filename.size() - 5);
  if (digits.empty() || digits.size() > 15) return -1;
  for (char c : digits)
    if (c < '0' || c > '9') return -1;
  return std::stoll(digits);
}

}  // namespace

CheckpointInfo checkpoint_info(const std::string& dir, int64_t step) {
  const std::string stem = (fs::path(dir) / fmt::format("{:07d}", step)).string();
  return {step, stem + ".safetensors", stem + ".json"};
}

CheckpointInfo write_checkpoint(const std::string& dir, int64_t step, const io::TensorMap& tensors,
                                const std::string& meta_json, int64_t keep_last) {
  if (step < 0) throw Error("write_checkpoint: negative step");
  nlohmann::json meta;
  try {
    meta = nlohmann::json::parse(meta_json.empty() ? "{}" : meta_json);
  } catch (const std::exception& e) {
    throw Error(std::string("write_checkpoint: meta is not valid JSON: ") + e.what());
  }
  if (!meta.is_object()) throw Error("write_checkpoint: meta must be a JSON object");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw Error("write_checkpoint: cannot create " + dir + ": " + ec.message());
  const CheckpointInfo info = checkpoint_info(dir, step);
  io::save_safetensors(info.weights_path, tensors, {{"format", "mdd-train-checkpoint"}, {"step", std::to_string(step)}});
  meta["step"] = step;
  meta["weights_file"] = fs::path(info.weights_path).filename().string();
  meta["weights_bytes"] = static_cast<int64_t>(fs::file_size(info.weights_path));
  // The sidecar goes last: its presence is what marks the checkpoint complete.
  write_text_file_atomic(info.meta_path, meta.dump(2) + "\n");
  if (keep_last > 0) {
    auto all = list_checkpoints(dir);
    if (int64_t(all.size()) > keep_last) {
      for (size_t i = 0; i + size_t(keep_last) < all.size(); ++i) {
        if (all[i].step == step) continue;
        // Sidecar first, so a crash in between leaves an orphan weights file, never a "complete"
        // checkpoint without weights.
        fs::remove(all[i].meta_path, ec);
        fs::remove(all[i].weights_path, ec);
      }
    }
  }
  return info;
}

std::vector<CheckpointInfo> list_checkpoints(const std::string& dir) {
  std::vector<CheckpointInfo> out;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return out;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const int64_t step = step_of(entry.path().filename().string());
    if (step < 0) continue;
    const CheckpointInfo info = checkpoint_info(dir, step);
    if (fs::exists(info.weights_path, ec)) out.push_back(info);
  }
  std::sort(out.begin(), out.end(), [](const CheckpointInfo& a, const CheckpointInfo& b) { return a.step < b.step; });
  return out;
}

LoadedCheckpoint read_checkpoint(const CheckpointInfo& info) {
  LoadedCheckpoint out;
  out.info = info;
  // A sidecar is a few KB; the cap keeps a hostile or runaway file from being read whole.
  out.meta_json = read_text_file(info.meta_path, uint64_t(64) << 20);
  nlohmann::json meta;
  try {
    meta = nlohmann::json::parse(out.meta_json);
  } catch (const std::exception& e) {
    throw Error(info.meta_path + ": checkpoint sidecar is not valid JSON: " + e.what());
  }
  if (!meta.is_object() || !meta.contains("step") || !meta["step"].is_number_integer() ||
      meta["step"].get<int64_t>() != info.step)
    throw Error(info.meta_path + ": checkpoint sidecar lacks the matching 'step'");
  std::error_code ec;
  const auto bytes = fs::file_size(info.weights_path, ec);
  if (ec) throw Error(info.weights_path + ": missing checkpoint weights");
  if (meta.contains("weights_bytes")) {
    // Type-checked here: a JSON type error must take the "skip this checkpoint" path like every
    // other defect, not escape it as a foreign exception.
    const auto& wb = meta["weights_bytes"];
    if (!wb.is_number_integer())
      throw Error(fmt::format("{}: 'weights_bytes' must be an integer, got {}", info.meta_path, detail::json_preview(wb)));
    if (wb.get<int64_t>() != static_cast<int64_t>(bytes))
      throw Error(fmt::format("{}: {} bytes on disk but the sidecar recorded {} (truncated or replaced)",
                              info.weights_path, bytes, wb.get<int64_t>()));
  }
  out.tensors = io::load_safetensors(info.weights_path).tensors;
  return out;
}

std::optional<LoadedCheckpoint> read_latest_checkpoint(const std::string& dir, std::vector<std::string>* skipped) {
  auto all = list_checkpoints(dir);
  for (auto it = all.rbegin(); it != all.rend(); ++it) {
    try {
      return read_checkpoint(*it);
    } catch (const Error& e) {
      if (skipped) skipped->push_back(e.what());
    }
  }
  return std::nullopt;
}

std::optional<LoadedCheckpoint> open_checkpoint_for_resume(const std::string& dir, const LogFn& log) {
  auto say = [&](const std::string& line) {
    if (log) log(line);
  };
  for (const auto& f : remove_orphan_temp_files(dir))
    say(fmt::format("resume: removed {} (a temporary file of a killed run)", f));
  const auto all = list_checkpoints(dir);
  std::vector<std::string> skipped;
  auto ck = read_latest_checkpoint(dir, &skipped);
  for (const auto& e : skipped) say("resume: skipped an unreadable checkpoint: " + e);
  if (ck && !skipped.empty())
    say(fmt::format("resume: fell back to step {} ({}), {} newer checkpoint(s) unreadable", ck->info.step,
                    ck->info.weights_path, skipped.size()));
  if (!ck && !all.empty())
    say(fmt::format("resume: none of the {} checkpoints in {} could be read; starting from step 0", all.size(), dir));
  return ck;
}

io::TensorMap load_model_weights(const std::string& path, const std::string& entry) {
  io::check_weight_entry(entry, "load_model_weights");
  io::TensorMap all = io::load_weights(path);
  auto has_prefix = [&](const std::string& name) {
    const std::string prefix = name + ".";
    return std::any_of(all.begin(), all.end(), [&](const auto& kv) { return kv.first.rfind(prefix, 0) == 0; });
  };
  // An mdd training checkpoint holds both copies under "model." and "ema." prefixes.
  if (!(has_prefix(io::kEmaEntry) && has_prefix(io::kModelEntry))) {
    // Plain state_dict, or a torch.save dict that io::load_weights already resolved to "ema"/"model".
    if (entry == io::kModelEntry && !all.empty()) {
      // For torch.save training dicts the entry choice matters; re-read with it.
      try {
        return io::load_torch_checkpoint(path, entry);
      } catch (const Error&) {
        return all;
      }
    }
    return all;
  }
  const std::string prefix = (entry.empty() ? io::default_weight_entry(has_prefix) : entry) + ".";
  io::TensorMap out = strip_prefix(all, prefix);
  if (out.empty()) throw Error(path + ": checkpoint has no '" + prefix + "*' tensors");
  return out;
}

io::TensorMap with_prefix(const io::TensorMap& m, const std::string& prefix) {
  io::TensorMap out;
  for (const auto& kv : m) out.emplace(prefix + kv.first, kv.second);
  return out;
}

io::TensorMap strip_prefix(const io::TensorMap& m, const std::string& prefix) {
  io::TensorMap out;
  for (const auto& kv : m)
    if (kv.first.rfind(prefix, 0) == 0) out.emplace(kv.first.substr(prefix.size()), kv.second);
  return out;
}

}  // namespace mdd
