#pragma once
/// \file
/// AdamW with a state that can be saved and restored exactly (for bit-for-bit resume).
///
/// LibTorch's `torch::optim::AdamW` keys its state by tensor-impl pointers, and that key type
/// changed between LibTorch 1.13 and 2.x, so its state cannot be checkpointed portably. This is the
/// same algorithm as PyTorch's single-tensor `AdamW` (decoupled weight decay, bias-corrected
/// moments, `eps` added after the square root), with the state as plain named tensors.
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <torch/arg.h>
#include <torch/types.h>

#include "mdd/export.h"

namespace mdd {

/// Hyper-parameters of AdamW (PyTorch defaults except the reference fine-tuning lr of 1e-3).
struct MDD_API AdamWOptions {
  /// Learning rate (constant; the reference uses no schedule).
  TORCH_ARG(double, lr) = 1e-3;
  /// Decoupled weight decay: p -= lr * wd * p before the Adam update (reference: 0).
  TORCH_ARG(double, weight_decay) = 0.0;
  /// First-moment decay.
  TORCH_ARG(double, beta1) = 0.9;
  /// Second-moment decay.
  TORCH_ARG(double, beta2) = 0.999;
  /// Added to sqrt(v_hat).
  TORCH_ARG(double, eps) = 1e-8;
};

/// AdamW over a fixed list of parameters. Parameters without a gradient in a step are skipped
/// (their moments and step count stay as they were), as in PyTorch. Float32 contiguous CPU
/// parameters are updated in one vectorised pass over parameter, gradient and moments (same
/// operations per element, so the result agrees with the op-by-op form to rounding); others
/// take the op-by-op form.
class MDD_API AdamW {
 public:
  /// Throws mdd::Error when a parameter is undefined or an option is out of range.
  AdamW(std::vector<torch::Tensor> params, AdamWOptions options = {});
  /// Sets every parameter's gradient to undefined (PyTorch `zero_grad(set_to_none=True)`).
  void zero_grad();
  /// One update from the current gradients (no autograd recording).
  void step();
  /// The parameters, in construction order.
  const std::vector<torch::Tensor>& params() const { return params_; }
  /// The options.
  const AdamWOptions& options() const { return options_; }
  /// Changes the learning rate for the following steps (warm-up schedules); throws mdd::Error
  /// for a negative or non-finite value.
  void set_lr(double lr);
  /// The state as named tensors: `<prefix><i>.step` (int64 scalar), `<prefix><i>.exp_avg`,
  /// `<prefix><i>.exp_avg_sq` for every parameter index i that has been updated at least once.
  std::map<std::string, torch::Tensor> state(const std::string& prefix = "") const;
  /// Restores a state written by `state(prefix)` (other keys are ignored). Throws mdd::Error when
  /// a tensor's shape differs from its parameter's or an index is out of range.
  void load_state(const std::map<std::string, torch::Tensor>& state, const std::string& prefix = "");

 private:
  struct Slot {
    int64_t step = 0;
    torch::Tensor exp_avg, exp_avg_sq;
  };
  std::vector<torch::Tensor> params_;
  std::vector<Slot> slots_;
  AdamWOptions options_;
};

}  // namespace mdd
