#pragma once
/// \file
/// The training data the fine-tuning loop draws from: latents of real images with two labels per
/// image, the local class id (0..nclass-1, keys the minimax memories) and the label the DiT is
/// conditioned on (e.g. the ImageNet index; reference train_dit.py `(x, ry, y)`).
#include <cstdint>
#include <memory>
#include <vector>

#include <torch/types.h>

#include "mdd/data/latent_cache.h"
#include "mdd/export.h"

namespace mdd {

/// One training batch in latent space (CPU tensors).
struct MDD_API LatentBatch {
  torch::Tensor latents;       ///< scaled latents z0, float32 [B, c, h, w]
  torch::Tensor labels;        ///< local class ids, int64 [B]
  torch::Tensor model_labels;  ///< labels the model is conditioned on, int64 [B]
  torch::Tensor indices;       ///< dataset indices, int64 [B]
};

/// A source of latent training batches.
class MDD_API TrainingData {
 public:
  virtual ~TrainingData() = default;
  /// Number of training items.
  virtual int64_t size() const = 0;
  /// Number of local classes.
  virtual int64_t num_classes() const = 0;
  /// Latent shape [c, h, w].
  virtual std::vector<int64_t> latent_shape() const = 0;
  /// Local labels of every item, int64 [N].
  virtual torch::Tensor labels() const = 0;
  /// The batch of `indices` (int64 [B]); every random draw comes from `generator` (CPU).
  virtual LatentBatch batch(const torch::Tensor& indices, torch::Generator& generator) const = 0;
};

/// Training data over a LatentCache: each draw is a fresh posterior sample of a randomly chosen
/// view (original or mirror), the distribution of the reference's per-step `vae.encode(flip(x))`.
class MDD_API LatentTrainingData : public TrainingData {
 public:
  /// `model_labels_of_class[c]` = the model label of local class c (identity when empty).
  /// `subset` (int64 indices into the cache, e.g. from `finetune_subset`) restricts the items;
  /// undefined = all. Throws mdd::Error on labels out of range or an empty set.
  LatentTrainingData(LatentCache cache, int64_t num_classes, std::vector<int64_t> model_labels_of_class = {},
                     torch::Tensor subset = {});
  int64_t size() const override;
  int64_t num_classes() const override { return num_classes_; }
  std::vector<int64_t> latent_shape() const override;
  torch::Tensor labels() const override { return labels_; }
  LatentBatch batch(const torch::Tensor& indices, torch::Generator& generator) const override;
  /// The model label of each local class.
  const std::vector<int64_t>& model_labels_of_class() const { return model_labels_; }

 private:
  LatentCache cache_;
  int64_t num_classes_;
  std::vector<int64_t> model_labels_;
  torch::Tensor model_label_map_;  // model_labels_ as int64 [num_classes]
  torch::Tensor subset_;  // int64 [N] indices into the cache
  torch::Tensor labels_;  // int64 [N]
};

/// The reference's `--finetune-ipc`: indices of the first `ipc` items of every class in dataset
/// order (ipc < 0 or 0 = all items). Throws mdd::Error when a class has fewer than `ipc` items.
MDD_API torch::Tensor finetune_subset(const torch::Tensor& labels, int64_t ipc);

/// The order in which epoch `epoch` visits items 0..size-1 (a seeded permutation that depends on
/// (seed, epoch) only, like a DistributedSampler with shuffle and set_epoch).
MDD_API torch::Tensor epoch_order(int64_t size, uint64_t seed, int64_t epoch);

}  // namespace mdd
