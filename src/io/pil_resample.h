#pragma once
// Pillow 9.4 resampler (libImaging/Resample.c) re-implemented for uint8 [H, W, C] tensors.
// Internal to the io area; the public entry points are mdd::resize / center_crop_arr / resize_shorter.
#include <cstdint>

#include <torch/types.h>

#include "mdd/io/image.h"

namespace mdd {
namespace detail {

/// Resizes `image` (uint8 [H, W, C], CPU, contiguous) to out_w x out_h like Pillow's
/// Image.resize((out_w, out_h), filter), but only produces the output window
/// [y0, y0 + win_h) x [x0, x0 + win_w). Every output pixel depends only on its own taps, so the
/// window equals the same crop of the full resize while skipping the work outside it.
torch::Tensor pil_resize_window(const torch::Tensor& image, int64_t out_w, int64_t out_h, ResampleFilter filter,
                                int64_t x0, int64_t y0, int64_t win_w, int64_t win_h);

}  // namespace detail
}  // namespace mdd
