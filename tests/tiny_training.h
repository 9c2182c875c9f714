#pragma once
// The small training setups shared by the training tests: 3 classes x 8 grey 8x8 images in pixel
// space and a 2-block DiT whose every parameter gets a gradient from step 1; a tiny VAE and images
// for it.
#include <filesystem>
#include <memory>
#include <string>

#include <torch/torch.h>

#include "mdd/data/latent_cache.h"
#include "mdd/data/training_data.h"
#include "mdd/models/autoencoder_kl.h"
#include "mdd/models/codec.h"
#include "mdd/models/dit.h"

namespace mdd_test {

/// 24 images (labels 0, 1, 2, 0, ...) cached under `dir` (created if needed).
inline std::shared_ptr<mdd::LatentTrainingData> tiny_data(const std::string& dir) {
  std::filesystem::create_directories(dir);
  auto gen = at::detail::createCPUGenerator(7);
  mdd::LabeledImages d;
  d.images = torch::randint(0, 256, {24, 8, 8, 1}, gen, torch::kInt64).to(torch::kUInt8);
  d.labels = torch::arange(24, torch::kInt64).remainder(3);
  d.class_names = {"a", "b", "c"};
  mdd::IdentityCodec codec;
  auto cache = mdd::LatentCache::build(dir + "/latents.safetensors", codec, d);
  return std::make_shared<mdd::LatentTrainingData>(cache, 3);
}

/// DiT(8, patch 2, 1 channel, width 32, depth 2, 2 heads, 3 classes) initialised from `seed`.
inline mdd::DiT tiny_dit(uint64_t seed = 1) {
  mdd::DiT m(mdd::DiTOptions(8, 2, 1, 32, 2, 2).num_classes(3));
  auto gen = at::detail::createCPUGenerator(seed);
  m->initialize_weights(gen);
  // Non-zero adaLN/final weights so gradients reach every parameter from step 1.
  torch::NoGradGuard ng;
  for (auto& p : m->parameters()) p.add_(torch::randn(p.sizes(), gen) * 0.02);
  return m;
}

/// A 2-level AutoencoderKL (1 channel, latent 2 x 4 x 4 for 8 x 8 images), PyTorch-default
/// initialisation from the global generator.
inline mdd::AutoencoderKL tiny_vae() {
  return mdd::AutoencoderKL(mdd::AutoencoderKLOptions().in_channels(1).out_channels(1).latent_channels(2)
                                .block_out_channels({8, 16}).layers_per_block(1).norm_num_groups(4).sample_size(8));
}

/// 24 smooth grey 8x8 images (learnable, unlike white noise), labels 0, 1, 2, 0, ...
inline mdd::LabeledImages tiny_vae_images() {
  auto gen = at::detail::createCPUGenerator(3);
  mdd::LabeledImages d;
  auto base = torch::rand({24, 1, 2, 2}, gen);
  d.images = (torch::upsample_bilinear2d(base, {8, 8}, false) * 255).round().clamp(0, 255).to(torch::kUInt8)
                 .permute({0, 2, 3, 1}).contiguous();
  d.labels = torch::arange(24, torch::kInt64).remainder(3);
  return d;
}

}  // namespace mdd_test
