#pragma once
/// \file
/// Classifier-free guidance: the one combine rule used by `DiT::forward_with_cfg` and `Sampler`.
/// Header-only: both the models and the diffusion area use it and neither links the other.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include <ATen/ATen.h>

#include "mdd/util/error.h"

namespace mdd {

/// Which output channels classifier-free guidance mixes.
enum class CfgGuidance {
  /// DiT/MinimaxDiffusion `forward_with_cfg`: `model_out[:, :3]` is guided, i.e. output channels
  /// 0..2 whatever they hold; the rest comes from the conditional half (reference default). With
  /// 4 latent channels that leaves eps channel 3 unguided; with one image channel and learned
  /// sigma the output has 2 channels and both (eps and the variance interpolation) are guided.
  kReference3Channels,
  /// Guide all eps channels (0..C-1); the variance channels come from the conditional half.
  kAllEpsChannels,
};

/// "reference" / "all".
inline const char* cfg_guidance_name(CfgGuidance g) {
  return g == CfgGuidance::kAllEpsChannels ? "all" : "reference";
}
/// Inverse of `cfg_guidance_name`; throws mdd::Error listing the valid names.
inline CfgGuidance parse_cfg_guidance(const char* name) {
  for (CfgGuidance g : {CfgGuidance::kReference3Channels, CfgGuidance::kAllEpsChannels})
    if (std::strcmp(name, cfg_guidance_name(g)) == 0) return g;
  throw Error(std::string("guidance \"") + name + "\": expected one of reference, all");
}

/// How many leading output channels `g` guides for a model with `in_channels` image channels and
/// `out_channels` output channels (2 x in_channels with learned sigma).
inline int64_t cfg_guided_channels(CfgGuidance g, int64_t in_channels, int64_t out_channels) {
  // The reference slices model_out[:, :3]; a slice past the end is simply shorter.
  return g == CfgGuidance::kAllEpsChannels ? in_channels : std::min<int64_t>(3, out_channels);
}

/// Guidance on one model call over [x, x] with labels [y, null]: `out` holds 2N rows, the
/// conditional half first. Returns N rows: channels [0, guided) are uncond + scale * (cond -
/// uncond) (the reference's expression and order), the others are the conditional half's.
/// Throws mdd::Error on an odd batch or too few channels.
inline at::Tensor cfg_combine(const at::Tensor& out, double scale, int64_t guided) {
  if (!out.defined() || out.dim() < 2 || out.size(0) % 2 != 0 || out.size(0) == 0)
    throw Error("cfg_combine: model output must have an even, non-empty batch [2N, C, ...], got shape " +
                (out.defined() ? c10::str(out.sizes()) : std::string("<undefined>")));
  if (guided < 1 || guided > out.size(1))
    throw Error("cfg_combine: cannot guide " + std::to_string(guided) + " channels of an output with " +
                std::to_string(out.size(1)));
  const int64_t n = out.size(0) / 2;
  const auto cond = out.narrow(0, 0, n);
  const auto uncond = out.narrow(0, n, n);
  const auto cond_eps = cond.narrow(1, 0, guided);
  const auto uncond_eps = uncond.narrow(1, 0, guided);
  const auto half_eps = uncond_eps + scale * (cond_eps - uncond_eps);
  if (guided == out.size(1)) return half_eps;
  return at::cat({half_eps, cond.narrow(1, guided, out.size(1) - guided)}, 1);
}

}  // namespace mdd
