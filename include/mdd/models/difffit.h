#pragma once
/// \file
/// DiffFit (Xie et al. 2023) parameter-efficient fine-tuning of a DiT, as MinimaxDiffusion uses it:
/// scale factors gamma in the first blocks, and only biases, gammas and the class table trainable.

#include <cstdint>
#include <string>
#include <vector>

#include <torch/arg.h>
#include <torch/nn/module.h>

#include "mdd/export.h"
#include "mdd/models/dit.h"

namespace mdd {

/// How many blocks get DiffFit gammas.
struct MDD_API DiffFitOptions {
  /// Blocks 0 .. min(gamma_blocks, depth) - 1 get gammas (the reference hard-codes 14 = half of
  /// DiT-XL's 28 blocks). Must be >= 0.
  TORCH_ARG(int64_t, gamma_blocks) = 14;
};

/// Adds the DiffFit scale factors (all initialised to 1, on the device/dtype of each block's
/// weights) to the first min(gamma_blocks, depth) blocks under the keys `blocks.i.gamma1`,
/// `blocks.i.gamma2` [D], `blocks.i.attn.gamma1` [3D] and `blocks.i.attn.gamma2` [D]; other blocks
/// get no keys. Then sets requires_grad = `is_difffit_trainable(name)` on every parameter, so only
/// biases, gammas and the class-embedding table (null row included) train; `pos_embed` stays frozen.
/// With all gammas = 1 the model computes exactly the same function as before.
/// Not idempotent by design: calling it on a model that already has gammas throws `mdd::Error`
/// (a second call is almost always a bug, e.g. a resumed run applying it twice).
MDD_API void apply_difffit(DiT& model, const DiffFitOptions& options = {});

/// True when any block of `model` has DiffFit gammas (i.e. `apply_difffit` ran).
MDD_API bool has_difffit(const DiT& model);

/// The reference substring rule (DiffFit-pytorch `mark_difffit_trainable`, used by MinimaxDiffusion
/// train_dit.py): a parameter trains iff its name contains "bias", "norm", "gamma" or "y_embed".
MDD_API bool is_difffit_trainable(const std::string& parameter_name);

/// Parameters of `module` (recursively) with requires_grad = true, in registration order.
MDD_API std::vector<torch::Tensor> trainable_parameters(const torch::nn::Module& module);

}  // namespace mdd
