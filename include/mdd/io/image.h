#pragma once
/// \file
/// Image decoding/encoding and the exact preprocessing of the reference code.
///
/// uint8 images are [H, W, C] (C = 1, 3 or 4), laid out like stb_image and `np.array(PIL image)`.
/// Every geometric operation here reproduces Pillow 9.4 / torchvision 0.14 bit for bit on uint8 input:
/// Pillow's separable fixed-point resampler (horizontal pass first, 22 fraction bits, clamp and
/// round to uint8 between the passes), torchvision's size and offset rounding rules. Float
/// conversions follow torchvision's float32 op order so that `to_tensor`/`normalize` are exact.

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <torch/types.h>

#include "mdd/export.h"

namespace mdd {

/// Decodes a PNG or JPEG file to uint8 [H, W, channels]. Only these two decoders are compiled in
/// (less attack surface, docs/security.md); any other format is an `mdd::Error`.
/// `channels` is 3 (RGB, the reference's `convert("RGB")`: alpha is dropped without compositing,
/// grey is replicated), 1 (PIL `convert("L")`: ITU-R 601 luma with Pillow's fixed point) or 4 (RGBA,
/// opaque alpha added when absent). A missing or undecodable file throws `mdd::Error` naming it.
MDD_API torch::Tensor read_image(const std::string& path, int64_t channels = 3);

/// Decodes an image held in memory; `name` identifies it in error messages. Same rules as read_image.
MDD_API torch::Tensor decode_image(const void* data, size_t size, int64_t channels = 3,
                                   const std::string& name = "<memory>");

/// Writes uint8 [H, W, C] (C in 1..4) or [H, W] as an 8-bit PNG, atomically (temporary + rename).
MDD_API void write_png(const std::string& path, const torch::Tensor& image_u8);

/// Encodes uint8 [H, W, C] or [H, W] as PNG bytes.
MDD_API std::vector<uint8_t> encode_png(const torch::Tensor& image_u8);

/// Pillow resampling filters (`Image.BOX`, `Image.BILINEAR`, `Image.BICUBIC`).
enum class ResampleFilter {
  Box,       ///< support 0.5, f(x) = 1 on (-0.5, 0.5]
  Bilinear,  ///< support 1, triangle
  Bicubic,   ///< support 2, Keys cubic with a = -0.5 (not torch's -0.75)
};

/// Pillow 9.4 `Image.resize((width, height), filter)` on a uint8 [H, W, C] image: the filter is
/// stretched by the scale when shrinking (always antialiased); same size returns a copy.
MDD_API torch::Tensor resize(const torch::Tensor& image_u8, int64_t width, int64_t height, ResampleFilter filter);

/// ADM/DiT training crop (`center_crop_arr` of DiT train.py): BOX-halve to (W//2, H//2) while the
/// short side >= 2*size, BICUBIC-resize so the short side is `size` (other side Python `round`),
/// then crop `size` x `size` at the floor-centred offset.
MDD_API torch::Tensor center_crop_arr(const torch::Tensor& image_u8, int64_t size);

/// torchvision `Resize(size)` on a PIL image: BILINEAR (antialiased) so the short side is `size`,
/// the long side `int(size * long / short)` (truncated); unchanged size returns a copy.
MDD_API torch::Tensor resize_shorter(const torch::Tensor& image_u8, int64_t size);

/// torchvision `CenterCrop(size)`: offsets `int(round((H - size) / 2.0))` (round half to even);
/// an image smaller than `size` is first zero-padded as torchvision does.
MDD_API torch::Tensor center_crop(const torch::Tensor& image_u8, int64_t size);

/// Horizontal flip of a uint8 [H, W, C] image (torchvision `hflip`).
MDD_API torch::Tensor hflip(const torch::Tensor& image_u8);

/// torchvision `ToTensor`: uint8 [H, W, C] -> float32 [C, H, W] = x / 255 (a true float32
/// division, not a multiply by 1/255). Also accepts a batch [N, H, W, C] -> [N, C, H, W].
MDD_API torch::Tensor to_tensor(const torch::Tensor& image_u8);

/// torchvision `Normalize(mean, std)`: (x - float32(mean_c)) / float32(std_c) in float32, on
/// [C, H, W] or [N, C, H, W]. `mean`/`std` need one entry per channel (or one for all).
MDD_API torch::Tensor normalize(const torch::Tensor& chw, const std::vector<double>& mean, const std::vector<double>& std);

/// ImageNet statistics used by the evaluation transform (MinimaxDiffusion data.py).
constexpr std::array<double, 3> kImageNetMean{0.485, 0.456, 0.406};
/// ImageNet standard deviations used by the evaluation transform.
constexpr std::array<double, 3> kImageNetStd{0.229, 0.224, 0.225};

/// Pixels of torchvision `save_image(x, normalize=True, value_range=(lo, hi))` for x [C, H, W]
/// (or a batch [N, C, H, W]): clamp to [lo, hi], subtract lo, divide by hi - lo, then
/// `mul(255).add_(0.5).clamp_(0, 255)` and truncate, in the same float ops as torchvision.
/// Returns uint8 [H, W, C] ([N, H, W, C]); channels are kept (save_image would replicate C = 1).
/// NaN input throws `mdd::Error`.
MDD_API torch::Tensor to_uint8_image(const torch::Tensor& chw, double lo = -1.0, double hi = 1.0);

/// torchvision `make_grid` layout for uint8 images [N, H, W, C]: `nrow` images per row,
/// `padding` pixels of `pad_value` around and between cells. Returns uint8 [H', W', C].
MDD_API torch::Tensor make_grid(const torch::Tensor& images_u8, int64_t nrow = 8, int64_t padding = 2,
                                uint8_t pad_value = 0);

/// A contact sheet: row i shows the images of `rows[i]` ([k_i, H, W, C], e.g. one class each),
/// left-aligned; missing cells are filled with `pad_value`. Returns uint8 [H', W', C].
MDD_API torch::Tensor contact_sheet(const std::vector<torch::Tensor>& rows, int64_t padding = 2, uint8_t pad_value = 0);

namespace io {
// The image functions are also reachable as mdd::io::... (the io area owns them).
using ::mdd::center_crop;
using ::mdd::center_crop_arr;
using ::mdd::read_image;
using ::mdd::resize_shorter;
using ::mdd::to_tensor;
using ::mdd::to_uint8_image;
using ::mdd::write_png;
}  // namespace io

}  // namespace mdd
