#include "mdd/models/codec.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "mdd/util/error.h"

namespace mdd {

namespace {
void require_defined(const DiagonalGaussian& g, const char* what) {
  if (!g.mean.defined() || !g.logvar.defined())
    throw Error(fmt::format("DiagonalGaussian::{}: mean/logvar not set", what));
}
}  // namespace

torch::Tensor DiagonalGaussian::std() const {
  require_defined(*this, "std");
  return torch::exp(0.5 * logvar);
}

torch::Tensor DiagonalGaussian::var() const {
  require_defined(*this, "var");
  return torch::exp(logvar);
}

torch::Tensor DiagonalGaussian::mode() const {
  require_defined(*this, "mode");
  return mean;
}

torch::Tensor DiagonalGaussian::sample(torch::Tensor noise) const {
  require_defined(*this, "sample");
  if (!noise.defined() || noise.sizes() != mean.sizes())
    throw Error(fmt::format("DiagonalGaussian::sample: noise shape {} != mean shape {}",
                            noise.defined() ? noise.sizes().vec() : std::vector<int64_t>{},
                            mean.sizes().vec()));
  return mean + std() * noise.to(mean.device(), mean.scalar_type());
}

torch::Tensor DiagonalGaussian::sample(at::Generator generator) const {
  require_defined(*this, "sample");
  // Drawn explicitly from the caller's generator so runs are reproducible (diffusers' sample()
  // uses randn_tensor(generator=...) the same way).
  torch::Tensor noise = at::randn(mean.sizes(), generator, mean.options());
  return mean + std() * noise;
}

DiagonalGaussian DiagonalGaussian::from_moments(const torch::Tensor& moments) {
  if (!moments.defined() || moments.dim() < 2 || moments.size(1) % 2 != 0)
    throw Error(fmt::format("DiagonalGaussian::from_moments: need [N, 2L, ...] moments, got shape {}",
                            moments.defined() ? moments.sizes().vec() : std::vector<int64_t>{}));
  auto parts = moments.chunk(2, 1);
  // Same clamp as diffusers: keeps exp(0.5*logvar) finite for saturated encoder outputs.
  return DiagonalGaussian{parts[0], torch::clamp(parts[1], -30.0, 20.0)};
}

DiagonalGaussian IdentityCodec::encode(const torch::Tensor& images) {
  if (!images.defined() || images.dim() != 4)
    throw Error(fmt::format("IdentityCodec::encode: expected images [N, C, H, W], got shape {}",
                            images.defined() ? images.sizes().vec() : std::vector<int64_t>{}));
  return DiagonalGaussian{images, torch::full_like(images, -30.0)};
}

torch::Tensor IdentityCodec::decode(const torch::Tensor& latents) {
  if (!latents.defined() || latents.dim() != 4)
    throw Error(fmt::format("IdentityCodec::decode: expected latents [N, C, H, W], got shape {}",
                            latents.defined() ? latents.sizes().vec() : std::vector<int64_t>{}));
  return latents.clone();
}

std::vector<int64_t> IdentityCodec::latent_shape(const std::vector<int64_t>& image_shape) const {
  if (image_shape.size() != 3)
    throw Error(fmt::format("IdentityCodec::latent_shape: expected [C, H, W], got {}", image_shape));
  return image_shape;
}

}  // namespace mdd
