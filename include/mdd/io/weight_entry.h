#pragma once
/// \file
/// Which weights of a training checkpoint a loader returns when the caller names none: the one rule
/// shared by `io::load_torch_checkpoint` (sub-dicts of a torch.save dict), `load_model_weights`
/// (prefixed tensors of an mdd checkpoint) and the config's `sample.entry`.
#include <functional>
#include <string>

#include "mdd/export.h"

namespace mdd {
namespace io {

/// The exponential moving average of the weights: what the reference samples from (sample.py
/// loads the checkpoint's "ema"), so it is the default.
inline constexpr char kEmaEntry[] = "ema";
/// The raw trained weights; the default only when a checkpoint holds no EMA.
inline constexpr char kModelEntry[] = "model";

/// The entry "" stands for: "ema" if `present("ema")`, else "model" if `present("model")`, else ""
/// (the file is a plain state_dict).
MDD_API std::string default_weight_entry(const std::function<bool(const std::string& entry)>& present);

/// Throws `mdd::Error` ("<where>: entry must be ...") unless `entry` is "", "ema" or "model".
MDD_API void check_weight_entry(const std::string& entry, const std::string& where);

}  // namespace io
}  // namespace mdd
