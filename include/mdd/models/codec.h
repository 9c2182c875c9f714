#pragma once
/// \file
/// The image <-> latent codec interface the pipeline is written against.

#include <cstdint>
#include <vector>

#include <torch/types.h>

#include "mdd/export.h"

namespace mdd {

/// A diagonal Gaussian posterior over latents (the VAE encoder's output).
/// `logvar` is clamped to [-30, 20] on construction by the producer, as diffusers does.
struct MDD_API DiagonalGaussian {
  torch::Tensor mean, logvar;
  /// exp(0.5 * logvar).
  torch::Tensor std() const;
  /// exp(logvar).
  torch::Tensor var() const;
  /// The mean (the distribution's mode).
  torch::Tensor mode() const;
  /// mean + std * noise; `noise` has the shape of `mean` (draw it with your own generator).
  /// Throws mdd::Error on a shape mismatch.
  torch::Tensor sample(torch::Tensor noise) const;
  /// mean + std * N(0, 1) with the noise drawn from `generator` (on mean's device, in mean's dtype).
  torch::Tensor sample(at::Generator generator) const;
  /// diffusers DiagonalGaussianDistribution(moments): mean = moments[:, :L], logvar =
  /// clamp(moments[:, L:], -30, 20) with L = moments.size(1) / 2 (an even channel count is required).
  static DiagonalGaussian from_moments(const torch::Tensor& moments);
};

/// Maps images in [-1, 1] ([N, C, H, W]) to latents and back. The pipeline multiplies encoder
/// samples by `scaling_factor()` before diffusion and divides by it before `decode`.
class MDD_API Codec {
 public:
  virtual ~Codec() = default;
  /// Posterior over (unscaled) latents for images in [-1, 1].
  virtual DiagonalGaussian encode(const torch::Tensor& images) = 0;
  /// Images in (approximately) [-1, 1] from (unscaled) latents.
  virtual torch::Tensor decode(const torch::Tensor& latents) = 0;
  /// Factor applied to latents before diffusion (0.18215 for Stable Diffusion's VAE, 1 for pixels).
  virtual double scaling_factor() const = 0;
  /// Latent shape [c, h, w] for an image shape [C, H, W].
  virtual std::vector<int64_t> latent_shape(const std::vector<int64_t>& image_shape) const = 0;
};

/// Pixel-space "codec" (diffusion directly on images): latents are the images themselves.
/// encode returns mean = images and logvar = -30 everywhere, the lowest value the VAE clamp allows,
/// so std = exp(-15) ~ 3.1e-7: sampling perturbs pixels by ~1e-7, far below 8-bit quantisation,
/// i.e. it is deterministic for every practical purpose while keeping the DiagonalGaussian contract
/// (finite logvar, sample() works). decode is the identity (a clone, so callers may write into it).
class MDD_API IdentityCodec : public Codec {
 public:
  /// mean = images, logvar = full_like(images, -30). Requires a 4-D [N, C, H, W] tensor.
  DiagonalGaussian encode(const torch::Tensor& images) override;
  /// Returns a copy of `latents` (4-D).
  torch::Tensor decode(const torch::Tensor& latents) override;
  /// 1.
  double scaling_factor() const override { return 1.0; }
  /// The image shape itself (3 entries required).
  std::vector<int64_t> latent_shape(const std::vector<int64_t>& image_shape) const override;
};

}  // namespace mdd
