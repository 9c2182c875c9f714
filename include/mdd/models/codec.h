#pragma once
/// \file
/// The image <-> latent codec interface the pipeline is written against.

#include <cstdint>
#include <vector>

#include <torch/types.h>

namespace mdd {

/// A diagonal Gaussian posterior over latents (the VAE encoder's output).
/// `logvar` is clamped to [-30, 20] on construction by the producer, as diffusers does.
struct DiagonalGaussian {
  torch::Tensor mean, logvar;
  /// exp(0.5 * logvar).
  torch::Tensor std() const;
  /// The mean (the distribution's mode).
  torch::Tensor mode() const;
  /// mean + std * noise; `noise` has the shape of `mean` (draw it with your own generator).
  torch::Tensor sample(torch::Tensor noise) const;
};

/// Maps images in [-1, 1] ([N, C, H, W]) to latents and back. The pipeline multiplies encoder
/// samples by `scaling_factor()` before diffusion and divides by it before `decode`.
class Codec {
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

}  // namespace mdd
