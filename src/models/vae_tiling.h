#pragma once
// Internal (not installed): how AutoencoderKL splits work it cannot do in one piece — diffusers'
// tiled encode/decode with cross-faded seams, and slicing a batch into chunks.
#include <cstdint>
#include <functional>

#include <torch/types.h>

namespace mdd::vae::detail {

using TensorFn = std::function<torch::Tensor(const torch::Tensor&)>;

/// diffusers blend_v / blend_h: over the first `extent` rows (dim 2) or columns (dim 3) of `b`,
/// cross-fade linearly from the last `extent` of `a`: b[y] = a[-extent + y] * (1 - y/extent) +
/// b[y] * (y/extent). Modifies `b` in place, like diffusers (later blends see blended tiles).
void blend(const torch::Tensor& a, torch::Tensor& b, int64_t extent, int64_t dim);

/// diffusers tiled_encode / tiled_decode: tiles of `tile` input pixels every `stride` pixels, each
/// mapped by `fn`; neighbours are cross-faded over `blend_extent` output pixels and every tile keeps
/// its first `row_limit` output rows/cols.
torch::Tensor tiled_apply(const torch::Tensor& x, int64_t tile, int64_t stride, int64_t blend_extent,
                          int64_t row_limit, const TensorFn& fn);

/// Runs `fn` over chunks of `slice` samples (0 = all at once) and concatenates the results.
torch::Tensor sliced(const torch::Tensor& x, int64_t slice, const TensorFn& fn);

}  // namespace mdd::vae::detail
