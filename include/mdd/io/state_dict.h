#pragma once
/// \file
/// Loading named weights into torch::nn modules under the reference's state_dict key names.

#include <string>
#include <vector>

#include <torch/nn/module.h>

#include "mdd/export.h"
#include "mdd/io/safetensors.h"

namespace mdd {
namespace io {

/// What `load_state_dict` found: keys the module has but the weights lack (`missing`), keys the
/// weights have but the module lacks (`unexpected`) and keys present in both with different
/// shapes (`mismatched`, as "key: module [a, b] vs weights [c, d]").
struct MDD_API LoadReport {
  std::vector<std::string> missing, unexpected, mismatched;
  /// True when nothing is missing, unexpected or mismatched.
  bool ok() const { return missing.empty() && unexpected.empty() && mismatched.empty(); }
  /// Human-readable summary listing every problem.
  std::string to_string() const;
};

/// Copies `weights` into the parameters and buffers of `module` (recursively, dotted names as in
/// PyTorch). Values are cast to each destination's dtype and device. Shape mismatches are never
/// copied. `strict = true` throws `mdd::Error` listing every problem (and copies nothing);
/// `strict = false` copies what matches and returns the report.
MDD_API LoadReport load_state_dict(torch::nn::Module& module, const TensorMap& weights,
                                   bool strict = true);

/// The parameters and buffers of `module` under their dotted names (detached, shared storage).
MDD_API TensorMap state_dict(const torch::nn::Module& module);

}  // namespace io

// The names the API contract gives them in namespace mdd (where they were first declared).
using io::load_state_dict;
using io::LoadReport;
using io::state_dict;

}  // namespace mdd
