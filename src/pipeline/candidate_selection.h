#pragma once
// Internal (not installed): keeping the best `sample.ipc` of `sample.candidates * sample.ipc`
// generated images per class. A generator's single draws are noisy: some images are off-class or
// near-duplicates. Herding the kept images toward the *real* class means in the embedding of a
// network trained on the real training split keeps the subset whose mean matches the real data
// (docs/fashion-mnist.md: +6 points over the first draw at IPC 10 on Fashion-MNIST).
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include <torch/torch.h>

#include "mdd/eval/evaluator.h"
#include "mdd/pipeline/config.h"
#include "mdd/pipeline/distill.h"

namespace mdd::detail {

/// The embedding candidate selection works in: a network trained on the real training split under
/// the evaluation protocol for `sample.select_epochs` epochs, and the real class means in it.
struct SelectionSpace {
  torch::nn::AnyModule net;
  ResolvedEval resolved;
  torch::Tensor real_means;  ///< [C, D] float64, row c = mean embedding of real class c
  double test_accuracy = 0;  ///< of the feature network (on the test split, or a train slice without one)
  double seconds = 0;
  int64_t train_images = 0;  ///< real images the network was trained on (`sample.select_per_class` or all)
};

/// Builds the space on first call and returns the same one afterwards (one feature network per
/// run, shared by every sampled method). `config` and `data` must outlive the returned function.
using SelectionSpaceFn = std::function<std::shared_ptr<const SelectionSpace>()>;
SelectionSpaceFn lazy_selection_space(const DistillConfig& config, const PipelineData& data, const PipelineCallbacks& cb);

/// The stream id of candidate `j` (0 <= j < candidates * ipc) of class `c`: the first `ipc` are the
/// ids a run without candidates uses (c * ipc + j), so `candidates` = 1 keeps its samples and the
/// base draw is always among the candidates; the extra ones follow all classes' base ids.
int64_t candidate_stream_id(int64_t c, int64_t j, int64_t ipc, int64_t candidates, int64_t nclass);

/// Indices (into `images_u8` / `labels`, grouped by class, in selection order) of the `ipc` images
/// per class that `sample.select` keeps. `space` is only called for feature-based methods.
torch::Tensor select_candidates(const SampleConfig& s, const torch::Tensor& images_u8, const torch::Tensor& labels,
                                const SelectionSpaceFn& space);

}  // namespace mdd::detail
