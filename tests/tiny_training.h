#pragma once
// The small training setup shared by the fine-tuning tests: 3 classes x 8 grey 8x8 images in pixel
// space and a 2-block DiT whose every parameter gets a gradient from step 1.
#include <filesystem>
#include <memory>
#include <string>

#include <torch/torch.h>

#include "mdd/data/latent_cache.h"
#include "mdd/data/training_data.h"
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

}  // namespace mdd_test
