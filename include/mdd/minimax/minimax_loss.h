#pragma once
/// \file
/// The minimax criteria of Minimax Diffusion: representativeness (stay close to the real
/// memory) and diversity (stay away from earlier predictions), with the reference's exact
/// semantics (MinimaxDiffusion train_dit.py:250-280).

#include <torch/arg.h>
#include <torch/types.h>

#include "mdd/export.h"
#include "mdd/minimax/memory_bank.h"

namespace mdd {

/// Weights of the two minimax terms (reference defaults `--lambda-pos 0.002`, `--lambda-neg 0.008`).
struct MDD_API MinimaxLossOptions {
  /// Weight of the representativeness term R (reference `--lambda-pos`).
  TORCH_ARG(double, lambda_r) = 0.002;
  /// Weight of the diversity term D (reference `--lambda-neg`).
  TORCH_ARG(double, lambda_d) = 0.008;
  /// Throw `mdd::Error` when a prediction row holds NaN/Inf (otherwise the terms become NaN).
  /// Free on CPU; on CUDA it costs one device-to-host sync per call.
  TORCH_ARG(bool, check_finite) = true;
};

/// The minimax terms of one batch. `representativeness`, `diversity` and `total` are 0-dim tensors
/// (dtype of `pred_x0`, float32 for reduced-precision inputs; device of `pred_x0`) that carry
/// gradient to `pred_x0`.
struct MDD_API MinimaxTerms {
  /// R = Σ_c (1 − min cos(pred_c, real_c)) / num_distinct_classes.
  torch::Tensor representativeness;
  /// D = Σ_c max cos(pred_c, generated_c) / num_distinct_classes.
  torch::Tensor diversity;
  /// λr·R + λd·D (the reference's `pos_match_loss + neg_match_loss`).
  torch::Tensor total;
  /// int64 `[K, 5]` (device of `pred_x0`), one row per contributing class in increasing class
  /// order: (class, batch row of the argmin, oldest-first real-bank index of the argmin,
  /// batch row of the argmax, oldest-first generated-bank index of the argmax). For inspection.
  torch::Tensor pairs;
};

/// The minimax loss of the reference (train_dit.py:250-280).
///
/// For every distinct class c of `labels` whose GENERATED bank is non-empty (the reference's
/// `if len(pseudo_memory[c])`), with q = the flattened rows of `pred_x0` of class c:
///   R_c = 1 − min over the whole [B_c × M_real] cosine matrix of q against `real`'s class c,
///   D_c = max over the whole [B_c × M_gen] cosine matrix of q against `generated`'s class c.
/// Both are summed over classes and divided by the number of DISTINCT classes in the batch,
/// including classes that contribute nothing because their generated bank is still empty.
///
/// - `pred_x0` `[B, ...]` floating point (its item numel must equal the banks'); `labels` integer
///   `[B]` with values in [0, num_classes) of both banks.
/// - The loss does NOT push: the caller pushes after computing it (real = z0, generated =
///   detached `pred_x0`), so the current batch is never compared with itself.
/// - Cosines use the plain L2 norms; a vector with norm < 1e-12 counts as a zero vector whose
///   cosine with anything is 0 with zero gradient (the reference returns NaN there).
/// - Only the selected (argmin, argmax) pair of each class receives gradient; exact ties go to the
///   first pair in row-major (batch row, oldest-first memory index) order.
/// - Throws `mdd::Error` on bad shapes/labels, on a class whose generated bank is non-empty while
///   its real bank is empty (the reference crashes there: `torch.cat([])`), and (with
///   `check_finite`) on NaN/Inf in `pred_x0`.
///
/// Runs as one fused autograd node: CPU (BLAS dots + parallel reductions) or CUDA kernels when
/// `pred_x0` is on a CUDA device and mdd was built with CUDA.
MDD_API MinimaxTerms minimax_loss(const torch::Tensor& pred_x0, const torch::Tensor& labels, const MemoryBank& real,
                                  const MemoryBank& generated, const MinimaxLossOptions& options = {});

/// The full cosine matrix `[rows.size(0), bank.size(label)]` between the flattened `rows` and the
/// items of class `label` of `bank` (oldest first), with the zero-vector rule of `minimax_loss`.
/// For inspection and tests; not differentiable through the bank.
MDD_API torch::Tensor bank_cosine(const torch::Tensor& rows, const MemoryBank& bank, int64_t label);

}  // namespace mdd
