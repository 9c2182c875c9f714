#pragma once
/// \file
/// A multi-threaded batch loader: worker threads build batches ahead of the consumer into a
/// bounded buffer; batch order and content depend only on the seed and the epoch.

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <torch/arg.h>
#include <torch/types.h>

#include "mdd/data/image_folder.h"
#include "mdd/export.h"

namespace mdd {

/// Options of a BatchLoader.
struct MDD_API BatchLoaderOptions {
  /// Samples per batch.
  TORCH_ARG(int64_t, batch_size) = 64;
  /// Visit samples in a seeded random order per epoch (false: 0, 1, 2, ...).
  TORCH_ARG(bool, shuffle) = true;
  /// Drop the last, incomplete batch of an epoch.
  TORCH_ARG(bool, drop_last) = false;
  /// Seed of the per-epoch permutations (the order of epoch e is a function of (seed, e) only).
  TORCH_ARG(uint64_t, seed) = 0;
  /// Worker threads building batches.
  TORCH_ARG(int64_t, num_workers) = 2;
  /// Batches that may be built ahead of the consumer (memory bound).
  TORCH_ARG(int64_t, prefetch_batches) = 4;
};

/// One batch: stacked samples, their labels (undefined when the loader has none) and dataset indices.
struct MDD_API Batch {
  torch::Tensor data;
  torch::Tensor labels;
  torch::Tensor indices;
};

/// Loads batches on worker threads. Samples come from a user function `sample(index)` returning a
/// tensor (all of one shape); batches are `torch::stack`ed. For a given seed and epoch the sequence
/// of batches is identical whatever the number of workers or timing. A failure in `sample` is
/// delivered to the consumer by `next()` as `mdd::Error` naming the sample. The destructor stops and
/// joins the workers (also mid-epoch). Not copyable or movable; `next()`/`start_epoch()` must be
/// called from one consumer thread.
class MDD_API BatchLoader {
 public:
  /// Produces sample `index` (called concurrently from worker threads; must be thread-safe).
  using SampleFn = std::function<torch::Tensor(int64_t index)>;

  /// `labels` (int64 [size] or undefined) are gathered per batch. Epoch 0 starts immediately.
  BatchLoader(int64_t size, SampleFn sample, torch::Tensor labels = {}, BatchLoaderOptions options = {});
  ~BatchLoader();
  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;

  /// Number of samples.
  int64_t size() const { return size_; }
  /// Batches in one epoch.
  int64_t batches_per_epoch() const;
  /// The epoch being served.
  int64_t epoch() const;
  /// Restarts at the beginning of `epoch` (discarding prefetched batches of the current one).
  /// A no-op when `epoch` is current and nothing of it was consumed yet.
  void start_epoch(int64_t epoch);
  /// The next batch of the current epoch into `out`; false at the end of the epoch.
  bool next(Batch& out);
  /// The sample order of `epoch` (what the batches will contain, concatenated).
  std::vector<int64_t> order(int64_t epoch) const;

 private:
  struct Slot {
    Batch batch;
    std::exception_ptr error;
  };
  void worker_loop();
  Batch build(int64_t batch_index, const std::vector<int64_t>& indices) const;

  int64_t size_;
  SampleFn sample_;
  torch::Tensor labels_;
  BatchLoaderOptions options_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<int64_t> order_;
  int64_t epoch_ = 0;
  uint64_t generation_ = 0;
  int64_t next_claim_ = 0;
  int64_t consumed_ = 0;
  bool stop_ = false;
  std::map<int64_t, Slot> ready_;
  std::vector<std::thread> workers_;
};

/// A loader over an ImageFolder: each sample is `transform(folder.read(i))` (or the decoded image
/// when `transform` is empty), labels are the folder's local labels.
MDD_API std::unique_ptr<BatchLoader> make_image_folder_loader(const ImageFolder& folder, ImageTransform transform,
                                                              BatchLoaderOptions options = {});

}  // namespace mdd
