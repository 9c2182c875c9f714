#pragma once
/// \file
/// Exponential moving average of model parameters (reference train_dit.py `update_ema`).
#include <torch/nn/module.h>

#include "mdd/export.h"

namespace mdd {

/// For every named parameter p of `model` (trainable or not): ema_p = decay * ema_p + (1 - decay) * p,
/// in place, without autograd. `ema` must have the same parameter names and shapes (e.g. a copy of
/// the model made before training; decay 0 copies). Buffers are not averaged, as in the reference.
/// Throws mdd::Error naming the first parameter that is missing or has another shape.
MDD_API void update_ema(torch::nn::Module& ema, const torch::nn::Module& model, double decay);

}  // namespace mdd
