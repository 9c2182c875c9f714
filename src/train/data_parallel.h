#pragma once
// The data-parallel pieces the trainers share (Finetuner/Pretrainer, VaeTrainer). Every rank draws the
// whole global batch exactly as one process would and keeps an equal share of its rows, so the mean of
// the ranks' gradients is the single-process gradient; these helpers do the rest: start from rank 0's
// weights, average gradients, write checkpoints on rank 0 alone, resume in a safe order.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <torch/nn/module.h>
#include <torch/types.h>

#include "mdd/dist/process_group.h"

namespace mdd::detail {

/// Throws mdd::Error naming `who` when a global batch of `batch` does not split into equal shares.
void check_batch_divides(const char* who, int64_t batch, const dist::ProcessGroup& pg);

/// Rows [r·B/W, (r+1)·B/W) of a global batch of B for rank r of W (all rows in one process).
std::pair<int64_t, int64_t> batch_shard(int64_t batch, const dist::ProcessGroup& pg);

/// Copies rank 0's parameters and buffers of `module` to every rank (as DistributedDataParallel
/// does), so a rank that initialised or loaded differently cannot drift apart silently.
void broadcast_from_main(dist::ProcessGroup pg, const torch::nn::Module& module);

/// Averages the gradients of `params` over the ranks, in buckets of at most `bucket_bytes` (0 = one
/// bucket). Every rank must pass the same list in the same order; a parameter without a gradient
/// contributes zeros (on every rank alike, since all run the same graph).
void average_gradients(dist::ProcessGroup pg, const std::vector<torch::Tensor>& params, int64_t bucket_bytes);

/// Averages gradients over the ranks while the backward pass runs, as DistributedDataParallel's
/// reducer does. The parameters are put in buckets (at most `bucket_bytes` each, one dtype each) in
/// reverse order, the order a backward mostly produces their gradients. A hook after each
/// parameter's gradient accumulation counts it in; a bucket whose gradients are all there starts
/// its all-reduce at once, on c10d's threads, while the backward goes on. Buckets start in index
/// order on every rank (c10d's rule), so a bucket waits for the ones before it. `finish()` after
/// the backward starts what is left (parameters the graph did not reach get zero gradients, as
/// in `average_gradients`), waits, and writes the means back: the same values as
/// `average_gradients`, element for element. Hooks outside an `arm()`..`finish()` window do
/// nothing. Every rank must build it from the same parameter list.
class OverlappedGradAverager {
 public:
  OverlappedGradAverager(dist::ProcessGroup pg, std::vector<torch::Tensor> params, int64_t bucket_bytes);
  ~OverlappedGradAverager();
  OverlappedGradAverager(const OverlappedGradAverager&) = delete;
  OverlappedGradAverager& operator=(const OverlappedGradAverager&) = delete;

  /// Opens the window for one backward pass (call before it).
  void arm();
  /// Closes it: after the backward, every rank; leaves the averaged gradients in `.grad`. Returns
  /// how many buckets had started during the backward.
  size_t finish();
  /// Number of buckets (for tests and logs).
  size_t buckets() const;

  struct State;

 private:
  std::shared_ptr<State> state_;
};

/// Rank 0 runs `write`, which writes checkpoint `step` into `dir` (every rank holds the same state),
/// and returns its weights path; the other ranks learn whether it succeeded and return the path it
/// has (`checkpoint_info`). A failed write stops every rank with the reason instead of a broken
/// collective later.
std::string write_checkpoint_on_main(dist::ProcessGroup pg, const std::function<std::string()>& write,
                                     const std::string& dir, int64_t step);

/// Resumes on every rank: rank 0 first (it removes what killed runs left behind), the others after
/// it; `resume_own(is_main)` returns whether a checkpoint was found and `step()` the step reached.
/// All ranks must land on the same step (else mdd::Error on every rank).
bool resume_in_order(dist::ProcessGroup pg, const std::function<bool(bool is_main)>& resume_own,
                     const std::function<int64_t()>& step);

}  // namespace mdd::detail
