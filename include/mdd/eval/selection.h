#pragma once
/// \file
/// Coreset selection per class: random, "first k" (the reference's `--slct_type random`, which
/// takes the first k files per class in sorted order), Herding and K-Center on features.
/// All functions return int64 indices into the given set, grouped by class (class 0 first) and,
/// within a class, in selection order.

#include <cstdint>
#include <string>

#include <torch/types.h>

#include "mdd/export.h"

namespace mdd {

struct LabeledImages;

/// `per_class` uniformly random samples of every class (without replacement), seeded.
MDD_API torch::Tensor select_random(const torch::Tensor& labels, int64_t per_class, uint64_t seed);

/// The first `per_class` samples of every class in the given order (the reference's "random"
/// selection over sorted file names).
MDD_API torch::Tensor select_first(const torch::Tensor& labels, int64_t per_class);

/// Herding (Welling 2009, as in iCaRL / the DC papers' baseline): per class, greedily add the
/// sample that brings the mean of the selected features closest (L2) to the class mean.
/// `features` [N, D] (e.g. the penultimate embedding of a trained network, `EvalNetImpl::embed`).
MDD_API torch::Tensor select_herding(const torch::Tensor& features, const torch::Tensor& labels, int64_t per_class);

/// Herding toward given per-class targets instead of each class's own mean: `targets` [C, D], row c
/// the target of label c. With the mean embedding of the *real* images of each class as targets and
/// generated images as candidates, it keeps the candidates whose mean best matches the real data
/// (see `class_means`). Non-finite features or targets throw mdd::Error.
MDD_API torch::Tensor select_herding(const torch::Tensor& features, const torch::Tensor& labels, int64_t per_class,
                                     const torch::Tensor& targets);

/// Mean feature per class, [num_classes, D] in float64; a class without samples throws mdd::Error.
MDD_API torch::Tensor class_means(const torch::Tensor& features, const torch::Tensor& labels, int64_t num_classes);

/// K-Center greedy (farthest-first traversal, Sener & Savarese 2018) per class: start from the
/// sample closest to the class mean (deterministic), then repeatedly add the sample whose L2
/// distance to its nearest selected sample is largest.
MDD_API torch::Tensor select_kcenter(const torch::Tensor& features, const torch::Tensor& labels, int64_t per_class);

/// Dispatch by name: "random" (seeded), "first", "herding", "kcenter". `features` may be
/// undefined for random/first. Unknown names or too few samples of a class throw mdd::Error.
MDD_API torch::Tensor select_coreset(const std::string& method, const torch::Tensor& features, const torch::Tensor& labels,
                                     int64_t per_class, uint64_t seed = 0);

/// The images/labels at `indices` (class names copied).
MDD_API LabeledImages subset(const LabeledImages& data, const torch::Tensor& indices);

}  // namespace mdd
