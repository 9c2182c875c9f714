#pragma once
/// \file
/// Cached VAE posteriors of a training set, so fine-tuning never runs the encoder.
///
/// The reference encodes every batch anew: `vae.encode(x).latent_dist.sample() * 0.18215`, where x is
/// the deterministic ADM crop, randomly flipped (p = 0.5). The crop is fixed, so the posterior of each
/// image and of its mirror can be computed once; a draw then picks a view with p = 0.5 and samples
/// mean + exp(0.5 logvar) * N(0, 1). That is the same distribution as the reference's.

#include <cstdint>
#include <string>
#include <vector>

#include <torch/arg.h>
#include <torch/types.h>

#include "mdd/data/labeled_images.h"
#include "mdd/export.h"
#include "mdd/models/codec.h"
#include "mdd/util/progress.h"

namespace mdd {

/// Options of LatentCache::build.
struct MDD_API LatentCacheOptions {
  /// Images per encoder call.
  TORCH_ARG(int64_t, batch_size) = 16;
  /// Device the codec runs on (images are moved there; moments come back to the CPU).
  TORCH_ARG(torch::Device, device) = torch::Device(torch::kCPU);
  /// Also encode the horizontal mirror (the reference's RandomHorizontalFlip).
  TORCH_ARG(bool, flip) = true;
  /// Identifies the codec weights (e.g. "sd-vae-ft-ema"); a cache written with another tag is rebuilt.
  TORCH_ARG(std::string, codec_tag) = "";
};

/// Posterior moments of every image (and its mirror) in a safetensors file: "mean" and "logvar"
/// float32 [N, V, c, h, w] (V = 2 views: original, mirrored; 1 without flips), "labels" int64 [N];
/// metadata records the image fingerprint, shapes, scaling factor and codec tag.
class MDD_API LatentCache {
 public:
  /// Loads `path` when it exists and matches `data` (same images and labels, by fingerprint), the
  /// codec's latent shape, scaling factor, tag and flip setting; otherwise encodes every image
  /// (uint8 [N, H, W, C] -> [-1, 1] as ToTensor + Normalize(0.5, 0.5)) and writes the file
  /// atomically. Progress stage: "encode_latents".
  static LatentCache build(const std::string& path, Codec& codec, const LabeledImages& data,
                           const LatentCacheOptions& options = {}, const ProgressFn& progress = {});
  /// Loads a cache file without checking it against a dataset; throws `mdd::Error` naming the file
  /// when it is missing or not a latent cache.
  static LatentCache load(const std::string& path);

  /// Number of images.
  int64_t size() const { return mean_.size(0); }
  /// Views per image (2 with flips).
  int64_t num_views() const { return mean_.size(1); }
  /// Posterior means, float32 [N, V, c, h, w] (unscaled).
  const torch::Tensor& mean() const { return mean_; }
  /// Posterior log-variances, float32 [N, V, c, h, w] (clamped to [-30, 20]).
  const torch::Tensor& logvar() const { return logvar_; }
  /// Labels int64 [N].
  const torch::Tensor& labels() const { return labels_; }
  /// The factor samples are multiplied by (the codec's `scaling_factor()`).
  double scaling_factor() const { return scaling_factor_; }
  /// True when build() reused an existing file instead of encoding.
  bool loaded_from_disk() const { return loaded_from_disk_; }

  /// Scaled latent samples for `indices` (int64 [B]): per item a view chosen with p = 0.5 (when
  /// V = 2), then (mean + exp(0.5 logvar) * eps) * scaling_factor. Draws, in this order:
  /// `torch::rand({B})` for the views, `torch::randn({B, c, h, w})` for eps, both from `generator`
  /// (a CPU generator). Returns float32 [B, c, h, w] on the CPU.
  torch::Tensor sample(const torch::Tensor& indices, torch::Generator& generator) const;

 private:
  torch::Tensor mean_, logvar_, labels_;
  double scaling_factor_ = 1.0;
  bool loaded_from_disk_ = false;
};

/// A 64-bit fingerprint of the images and labels of a data set (used to validate caches).
MDD_API std::string dataset_fingerprint(const LabeledImages& data);

}  // namespace mdd
