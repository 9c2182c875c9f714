#pragma once
/// \file
/// Maximum mean discrepancy between two feature sets (the paper's Table 2 distribution metric,
/// re-implemented from the paper text: the reference code has none). Features come from a network
/// trained on the full real data, e.g. `EvalNetImpl::embed` of a network trained by `Evaluator`.

#include <cstdint>
#include <vector>

#include <torch/arg.h>
#include <torch/types.h>

#include "mdd/export.h"

namespace mdd {

/// Kernel choice for `mmd2`. The Gaussian kernel is k(x, y) = exp(-|x - y|^2 / (2 sigma^2)).
struct MDD_API MMDOptions {
  /// Explicit bandwidths sigma; empty = the median heuristic (sigma = median pairwise distance
  /// of the pooled set, distinct pairs), optionally multiplied by `multipliers`.
  TORCH_ARG(std::vector<double>, bandwidths) = {};
  /// With the median heuristic: use sigma_med * m for each m (kernel = the sum). {1} = single.
  TORCH_ARG(std::vector<double>, multipliers) = std::vector<double>{1.0};
};

/// The median heuristic bandwidth: median Euclidean distance over distinct pairs of rows of
/// cat(x, y). Computed in float64.
MDD_API double median_bandwidth(const torch::Tensor& x, const torch::Tensor& y);

/// Unbiased MMD^2 (Gretton et al. 2012, eq. 3) between x [m, D] and y [n, D] (m, n >= 2):
/// sum_{i!=j} k(x_i,x_j) / (m(m-1)) + sum_{i!=j} k(y_i,y_j) / (n(n-1)) - 2 sum_{i,j} k(x_i,y_j) / (mn).
/// Can be slightly negative for identical distributions (it is unbiased). Computed in float64.
MDD_API double mmd2(const torch::Tensor& x, const torch::Tensor& y, const MMDOptions& options = {});

}  // namespace mdd
