#pragma once
/// \file
/// Training checkpoints: one safetensors file (model, EMA, optimizer state, memory banks, ...) plus
/// a JSON sidecar (config, step, seeds), both written atomically. The JSON is written last, so a
/// checkpoint is complete exactly when its JSON exists; a run killed mid-write leaves the previous
/// checkpoint as the latest one.
///
/// Layout: `<dir>/<step:07d>.safetensors` and `<dir>/<step:07d>.json` (the reference names its
/// checkpoints `<step:07d>.pt`). Tensor keys are prefixed by their role: `model.`, `ema.`, `opt.`,
/// `bank.real.`, `bank.generated.`.
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "mdd/export.h"
#include "mdd/io/safetensors.h"
#include "mdd/util/progress.h"

namespace mdd {

/// A complete checkpoint found on disk.
struct MDD_API CheckpointInfo {
  int64_t step = 0;
  std::string weights_path;  ///< `<dir>/<step:07d>.safetensors`
  std::string meta_path;     ///< `<dir>/<step:07d>.json`
};

/// A checkpoint read into memory.
struct MDD_API LoadedCheckpoint {
  CheckpointInfo info;
  io::TensorMap tensors;
  std::string meta_json;  ///< the sidecar's text (a JSON object)
};

/// The files checkpoint `step` of `dir` has (or would have): `<dir>/<step:07d>.safetensors|json`.
MDD_API CheckpointInfo checkpoint_info(const std::string& dir, int64_t step);

/// Writes checkpoint `step` into `dir` (created if needed): tensors first, then the JSON sidecar
/// `meta_json` (must be a JSON object; `step` and the weights file size are added to it).
/// With `keep_last` > 0, older complete checkpoints beyond the newest `keep_last` are deleted
/// afterwards. Returns the new checkpoint. Throws mdd::Error on I/O failure (the previous
/// checkpoints are untouched then).
MDD_API CheckpointInfo write_checkpoint(const std::string& dir, int64_t step, const io::TensorMap& tensors,
                                        const std::string& meta_json = "{}", int64_t keep_last = 0);

/// Complete checkpoints in `dir`, oldest first (empty when `dir` does not exist).
MDD_API std::vector<CheckpointInfo> list_checkpoints(const std::string& dir);

/// Reads one checkpoint; throws mdd::Error naming the file when it is truncated, corrupt or its
/// size disagrees with the sidecar.
MDD_API LoadedCheckpoint read_checkpoint(const CheckpointInfo& info);

/// The newest checkpoint of `dir` that reads back cleanly. Newer ones that fail to read are
/// skipped and their error messages appended to `skipped` (when given). std::nullopt if none.
MDD_API std::optional<LoadedCheckpoint> read_latest_checkpoint(const std::string& dir,
                                                                std::vector<std::string>* skipped = nullptr);

/// What a trainer's resume() does with `dir`: removes temporary files that killed runs left there,
/// then reads the newest checkpoint that reads back cleanly. Every deviation from "the newest
/// checkpoint loaded" goes to `log` — each skipped checkpoint with its error, the step it fell back
/// to, "starting from step 0" when checkpoints exist but none reads — so a fallback is never silent.
MDD_API std::optional<LoadedCheckpoint> open_checkpoint_for_resume(const std::string& dir, const LogFn& log = {});

/// `m` with `prefix` put in front of every key (e.g. "model." for the model's entry of a checkpoint).
MDD_API io::TensorMap with_prefix(const io::TensorMap& m, const std::string& prefix);
/// The entries of `m` whose key starts with `prefix`, with the prefix removed (others are dropped).
MDD_API io::TensorMap strip_prefix(const io::TensorMap& m, const std::string& prefix);

/// Model weights from any supported file: an mdd training checkpoint (`entry` = "ema" or "model"
/// picks the `ema.` / `model.` tensors, prefix removed), a reference `torch.save` training dict
/// (same `entry` rule, see io::load_torch_checkpoint) or a plain state_dict (.safetensors / .pt /
/// .bin). `entry` = "" means "ema" when present, else "model", else the whole file.
MDD_API io::TensorMap load_model_weights(const std::string& path, const std::string& entry = "");

}  // namespace mdd
