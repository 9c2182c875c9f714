#include "mdd/io/image.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include "stb_image.h"  // third_party/stb (v2.30), see src/io/stb_impl.cpp
#include <stb_image_write.h>

#include "io/pil_resample.h"
#include "mdd/io/input_limits.h"
#include "mdd/util/error.h"
#include "util/file_util.h"
#include "util/shape_str.h"

namespace mdd {
namespace {

// Every decode and resize result is checked against the input budget before it is allocated: a
// small file can claim (or a thin image can be scaled to) billions of pixels.
void check_pixels(int64_t w, int64_t h, const std::string& what) {
  const uint64_t limit = io::input_limits().max_image_pixels;
  if (w > 0 && h > 0 && uint64_t(w) > limit / uint64_t(h))
    throw Error(fmt::format("{}: {}x{} pixels exceed the {} allowed (mdd::io::InputLimits::max_image_pixels)", what, w,
                            h, limit));
}

// Validates a uint8 image and returns it as a contiguous CPU [H, W, C] tensor ([H, W] -> C = 1).
torch::Tensor as_hwc(const torch::Tensor& image, const char* what) {
  if (!image.defined()) throw Error(fmt::format("{}: undefined image tensor", what));
  if (image.scalar_type() != torch::kUInt8)
    throw Error(fmt::format("{}: expected a uint8 image, got {}", what, c10::toString(image.scalar_type())));
  torch::Tensor t = image;
  if (t.dim() == 2) t = t.unsqueeze(2);
  if (t.dim() != 3 || t.size(2) < 1 || t.size(2) > 4)
    throw Error(fmt::format("{}: expected an image [H, W, C] with C in 1..4 (or [H, W]), got {}", what,
                            shape_str(image)));
  if (t.size(0) <= 0 || t.size(1) <= 0) throw Error(fmt::format("{}: empty image {}", what, shape_str(image)));
  return t.to(torch::kCPU).contiguous();
}

struct StbFree {
  void operator()(unsigned char* p) const { stbi_image_free(p); }
};

// PIL's RGB -> L conversion (Convert.c, L24): ITU-R 601-2 luma in 16-bit fixed point.
inline uint8_t pil_luma(uint8_t r, uint8_t g, uint8_t b) {
  return uint8_t((uint32_t(r) * 19595u + uint32_t(g) * 38470u + uint32_t(b) * 7471u + 0x8000u) >> 16);
}

}  // namespace

torch::Tensor decode_image(const void* data, size_t size, int64_t channels, const std::string& name) {
  if (channels != 1 && channels != 3 && channels != 4)
    throw Error(fmt::format("{}: channels must be 1, 3 or 4, got {}", name, channels));
  if (size == 0) throw Error(fmt::format("{}: empty file, not an image", name));
  if (size > size_t(std::numeric_limits<int>::max())) throw Error(fmt::format("{}: file too large to decode", name));
  const auto* bytes = static_cast<const stbi_uc*>(data);
  int w = 0, h = 0, native = 0;
  if (!stbi_info_from_memory(bytes, int(size), &w, &h, &native))
    throw Error(fmt::format("{}: cannot decode image ({})", name, stbi_failure_reason()));
  check_pixels(w, h, name);
  // stb's own RGB->grey weights differ from PIL's; for colour sources decode RGB and convert here.
  const bool luma_from_rgb = channels == 1 && native >= 3;
  const int request = luma_from_rgb ? 3 : int(channels);
  int n = 0;
  std::unique_ptr<unsigned char, StbFree> pixels(stbi_load_from_memory(bytes, int(size), &w, &h, &n, request));
  if (!pixels) throw Error(fmt::format("{}: cannot decode image ({})", name, stbi_failure_reason()));
  if (w <= 0 || h <= 0) throw Error(fmt::format("{}: decoded an empty image {}x{}", name, w, h));
  auto out = torch::empty({h, w, channels}, torch::kUInt8);
  uint8_t* dst = out.data_ptr<uint8_t>();
  const size_t npix = size_t(w) * size_t(h);
  if (luma_from_rgb) {
    const unsigned char* p = pixels.get();
    for (size_t i = 0; i < npix; ++i) dst[i] = pil_luma(p[3 * i], p[3 * i + 1], p[3 * i + 2]);
  } else {
    std::memcpy(dst, pixels.get(), npix * size_t(channels));
  }
  return out;
}

torch::Tensor read_image(const std::string& path, int64_t channels) {
  const torch::Tensor bytes = read_file_bytes(path);  // throws naming the file when missing
  return decode_image(bytes.data_ptr(), size_t(bytes.numel()), channels, path);
}

std::vector<uint8_t> encode_png(const torch::Tensor& image_u8) {
  const torch::Tensor img = as_hwc(image_u8, "encode_png");
  const int h = int(img.size(0)), w = int(img.size(1)), c = int(img.size(2));
  std::vector<uint8_t> buffer;
  auto sink = [](void* ctx, void* data, int size) {
    auto* b = static_cast<std::vector<uint8_t>*>(ctx);
    const auto* p = static_cast<const uint8_t*>(data);
    b->insert(b->end(), p, p + size);
  };
  if (!stbi_write_png_to_func(sink, &buffer, w, h, c, img.data_ptr<uint8_t>(), w * c))
    throw Error(fmt::format("encode_png: stb_image_write failed for an image {}", shape_str(image_u8)));
  return buffer;
}

void write_png(const std::string& path, const torch::Tensor& image_u8) {
  std::vector<uint8_t> png;
  try {
    png = encode_png(image_u8);
  } catch (const Error& e) {
    throw Error(fmt::format("{}: {}", path, e.what()));
  }
  AtomicFileWriter writer(path);
  writer.write(png.data(), png.size());
  writer.commit();
}

torch::Tensor resize(const torch::Tensor& image_u8, int64_t width, int64_t height, ResampleFilter filter) {
  const torch::Tensor img = as_hwc(image_u8, "resize");
  if (width <= 0 || height <= 0)
    throw Error(fmt::format("resize: target size {}x{} must be positive (image {})", width, height, shape_str(image_u8)));
  check_pixels(width, height, "resize");
  torch::Tensor out = detail::pil_resize_window(img, width, height, filter, 0, 0, width, height);
  return image_u8.dim() == 2 ? out.squeeze(2) : out;
}

torch::Tensor center_crop_arr(const torch::Tensor& image_u8, int64_t size) {
  torch::Tensor img = as_hwc(image_u8, "center_crop_arr");
  if (size <= 0) throw Error(fmt::format("center_crop_arr: size must be positive, got {}", size));
  int64_t h = img.size(0), w = img.size(1);
  // BOX "halving": (W // 2, H // 2), which for odd sizes is not a 2x2 mean (scale W / (W // 2)).
  while (std::min(w, h) >= 2 * size) {
    img = detail::pil_resize_window(img, w / 2, h / 2, ResampleFilter::Box, 0, 0, w / 2, h / 2);
    w /= 2;
    h /= 2;
  }
  // Python: scale = S / min(size); round(x * scale) -> double product, round half to even.
  const double scale = double(size) / double(std::min(w, h));
  const auto nw = int64_t(std::nearbyint(double(w) * scale));
  const auto nh = int64_t(std::nearbyint(double(h) * scale));
  if (nw < size || nh < size)
    throw Error(fmt::format("center_crop_arr: resized {}x{} is smaller than the crop {}", nw, nh, size));
  check_pixels(nw, nh, fmt::format("center_crop_arr: a {}x{} image scaled for a {} px crop", w, h, size));
  // Floor offsets ((H - S) // 2); only the crop window of the BICUBIC resize is computed.
  const int64_t crop_y = (nh - size) / 2, crop_x = (nw - size) / 2;
  torch::Tensor out = detail::pil_resize_window(img, nw, nh, ResampleFilter::Bicubic, crop_x, crop_y, size, size);
  return image_u8.dim() == 2 ? out.squeeze(2) : out;
}

torch::Tensor resize_shorter(const torch::Tensor& image_u8, int64_t size) {
  const torch::Tensor img = as_hwc(image_u8, "resize_shorter");
  if (size <= 0) throw Error(fmt::format("resize_shorter: size must be positive, got {}", size));
  const int64_t h = img.size(0), w = img.size(1);
  // torchvision _compute_resized_output_size: short = w if w <= h; long = int(size * long / short).
  // Integer division equals Python's int(float quotient) here: the quotient is at least 1/short
  // away from the next integer, far more than double rounding can move it.
  int64_t nw, nh;
  if (w <= h) {
    nw = size;
    nh = size * h / w;
  } else {
    nh = size;
    nw = size * w / h;
  }
  check_pixels(nw, nh, fmt::format("resize_shorter: a {}x{} image scaled to {} px", w, h, size));
  torch::Tensor out = (nw == w && nh == h)
                          ? img.clone()
                          : detail::pil_resize_window(img, nw, nh, ResampleFilter::Bilinear, 0, 0, nw, nh);
  return image_u8.dim() == 2 ? out.squeeze(2) : out;
}

torch::Tensor center_crop(const torch::Tensor& image_u8, int64_t size) {
  torch::Tensor img = as_hwc(image_u8, "center_crop");
  if (size <= 0) throw Error(fmt::format("center_crop: size must be positive, got {}", size));
  int64_t h = img.size(0), w = img.size(1);
  if (size > w || size > h) {
    // torchvision pads with zeros: left/top (d // 2), right/bottom ((d + 1) // 2).
    const int64_t pl = size > w ? (size - w) / 2 : 0, pt = size > h ? (size - h) / 2 : 0;
    const int64_t nw = std::max(w, size), nh = std::max(h, size);
    check_pixels(nw, nh, "center_crop (padded)");
    auto padded = torch::zeros({nh, nw, img.size(2)}, torch::kUInt8);
    padded.narrow(0, pt, h).narrow(1, pl, w).copy_(img);
    img = padded;
    h = nh;
    w = nw;
  }
  // int(round((H - S) / 2.0)): Python rounds half to even (d = 33 -> 16, d = 87 -> 44).
  const auto top = int64_t(std::nearbyint(double(h - size) / 2.0));
  const auto left = int64_t(std::nearbyint(double(w - size) / 2.0));
  torch::Tensor out = img.narrow(0, top, size).narrow(1, left, size).contiguous();
  return image_u8.dim() == 2 ? out.squeeze(2) : out;
}

torch::Tensor hflip(const torch::Tensor& image_u8) {
  if (image_u8.dim() < 2) throw Error(fmt::format("hflip: expected [H, W, C] or [H, W], got {}", shape_str(image_u8)));
  return image_u8.flip({image_u8.dim() == 2 ? 1 : image_u8.dim() - 2}).contiguous();
}

torch::Tensor to_tensor(const torch::Tensor& image_u8) {
  if (!image_u8.defined() || image_u8.scalar_type() != torch::kUInt8 || (image_u8.dim() != 3 && image_u8.dim() != 4))
    throw Error(fmt::format("to_tensor: expected uint8 [H, W, C] or [N, H, W, C], got {} {}",
                            image_u8.defined() ? c10::toString(image_u8.scalar_type()) : "undefined",
                            image_u8.defined() ? shape_str(image_u8) : ""));
  // A 256-entry table of float32(v) / 255.0f: the true float32 quotient torchvision computes
  // (multiplying by 1/255 would differ on 126 levels).
  static const torch::Tensor lut = [] {
    auto t = torch::empty({256}, torch::kFloat32);
    float* p = t.data_ptr<float>();
    for (int v = 0; v < 256; ++v) p[v] = float(v) / 255.0f;
    return t;
  }();
  const bool batched = image_u8.dim() == 4;
  const torch::Tensor chw = batched ? image_u8.permute({0, 3, 1, 2}) : image_u8.permute({2, 0, 1});
  if (chw.device().is_cpu()) {
    const torch::Tensor src = chw.contiguous();
    auto out = torch::empty(src.sizes(), torch::kFloat32);
    const uint8_t* s = src.data_ptr<uint8_t>();
    float* d = out.data_ptr<float>();
    const float* l = lut.data_ptr<float>();
    const int64_t n = src.numel();
    for (int64_t i = 0; i < n; ++i) d[i] = l[s[i]];
    return out;
  }
  return lut.to(chw.device()).index({chw.to(torch::kLong)});
}

torch::Tensor normalize(const torch::Tensor& chw, const std::vector<double>& mean, const std::vector<double>& std) {
  if (!chw.defined() || !chw.is_floating_point() || (chw.dim() != 3 && chw.dim() != 4))
    throw Error(fmt::format("normalize: expected a float [C, H, W] or [N, C, H, W] tensor, got {}",
                            chw.defined() ? shape_str(chw) : "undefined"));
  const int64_t c = chw.size(chw.dim() - 3);
  auto pick = [&](const std::vector<double>& v, int64_t i, const char* what) {
    if (v.size() == 1) return v[0];
    if (int64_t(v.size()) != c)
      throw Error(fmt::format("normalize: {} has {} entries for {} channels (tensor {})", what, v.size(), c, shape_str(chw)));
    return v[size_t(i)];
  };
  for (int64_t i = 0; i < c; ++i)
    if (pick(std, i, "std") == 0.0) throw Error("normalize: std must be non-zero");
  if (chw.scalar_type() == torch::kFloat32 && chw.device().is_cpu()) {
    // float32 sub then div per element: exactly torchvision's tensor.sub_(mean).div_(std).
    const torch::Tensor src = chw.contiguous();
    auto out = torch::empty_like(src);
    const int64_t n_img = chw.dim() == 4 ? chw.size(0) : 1;
    const int64_t plane = src.size(src.dim() - 1) * src.size(src.dim() - 2);
    const float* s = src.data_ptr<float>();
    float* d = out.data_ptr<float>();
    for (int64_t b = 0; b < n_img; ++b)
      for (int64_t ch = 0; ch < c; ++ch) {
        const float m = float(pick(mean, ch, "mean")), sd = float(pick(std, ch, "std"));
        const int64_t off = (b * c + ch) * plane;
        for (int64_t i = 0; i < plane; ++i) d[off + i] = (s[off + i] - m) / sd;
      }
    return out;
  }
  std::vector<float> m(static_cast<size_t>(c)), s(static_cast<size_t>(c));
  for (int64_t i = 0; i < c; ++i) {
    m[size_t(i)] = float(pick(mean, i, "mean"));
    s[size_t(i)] = float(pick(std, i, "std"));
  }
  auto opts = torch::TensorOptions().dtype(torch::kFloat32);
  auto mt = torch::from_blob(m.data(), {c, 1, 1}, opts).clone().to(chw.device(), chw.scalar_type());
  auto st = torch::from_blob(s.data(), {c, 1, 1}, opts).clone().to(chw.device(), chw.scalar_type());
  return chw.sub(mt).div(st);
}

torch::Tensor to_uint8_image(const torch::Tensor& chw, double lo, double hi) {
  if (!chw.defined() || !chw.is_floating_point() || (chw.dim() != 3 && chw.dim() != 4))
    throw Error(fmt::format("to_uint8_image: expected a float [C, H, W] or [N, C, H, W] tensor, got {}",
                            chw.defined() ? shape_str(chw) : "undefined"));
  if (!(hi > lo)) throw Error(fmt::format("to_uint8_image: value range ({}, {}) is empty", lo, hi));
  if (chw.isnan().any().item<bool>()) throw Error(fmt::format("to_uint8_image: NaN in image {}", shape_str(chw)));
  // The same tensor ops, in the same order and with the same Python-float scalars, as
  // torchvision make_grid(normalize=True) + save_image; truncating cast at the end.
  torch::Tensor x = chw.detach().clamp(lo, hi).sub(lo).div(std::max(hi - lo, 1e-5));
  x = x.mul(255).add_(0.5).clamp_(0, 255);
  x = chw.dim() == 4 ? x.permute({0, 2, 3, 1}) : x.permute({1, 2, 0});
  return x.to(torch::kCPU, torch::kUInt8).contiguous();
}

namespace {

// Places `img` ([H, W, C]) in cell (row, col) of a grid with cells of (h + padding) x (w + padding).
void put_cell(torch::Tensor& grid, const torch::Tensor& img, int64_t row, int64_t col, int64_t padding) {
  const int64_t h = img.size(0), w = img.size(1);
  grid.narrow(0, row * (h + padding) + padding, h).narrow(1, col * (w + padding) + padding, w).copy_(img);
}

}  // namespace

torch::Tensor make_grid(const torch::Tensor& images_u8, int64_t nrow, int64_t padding, uint8_t pad_value) {
  if (!images_u8.defined() || images_u8.scalar_type() != torch::kUInt8 || images_u8.dim() != 4 || images_u8.size(0) == 0)
    throw Error(fmt::format("make_grid: expected uint8 images [N, H, W, C] with N > 0, got {}",
                            images_u8.defined() ? shape_str(images_u8) : "undefined"));
  if (nrow <= 0 || padding < 0) throw Error(fmt::format("make_grid: bad nrow {} / padding {}", nrow, padding));
  const torch::Tensor imgs = images_u8.to(torch::kCPU);
  const int64_t n = imgs.size(0), h = imgs.size(1), w = imgs.size(2), c = imgs.size(3);
  const int64_t xmaps = std::min(nrow, n), ymaps = (n + xmaps - 1) / xmaps;
  auto grid = torch::full({ymaps * (h + padding) + padding, xmaps * (w + padding) + padding, c}, int64_t(pad_value),
                          torch::kUInt8);
  for (int64_t k = 0; k < n; ++k) put_cell(grid, imgs[k], k / xmaps, k % xmaps, padding);
  return grid;
}

torch::Tensor contact_sheet(const std::vector<torch::Tensor>& rows, int64_t padding, uint8_t pad_value) {
  if (rows.empty()) throw Error("contact_sheet: no rows");
  if (padding < 0) throw Error(fmt::format("contact_sheet: bad padding {}", padding));
  int64_t h = -1, w = -1, c = -1, cols = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    const torch::Tensor& r = rows[i];
    if (!r.defined() || r.scalar_type() != torch::kUInt8 || r.dim() != 4)
      throw Error(fmt::format("contact_sheet: row {} must be uint8 [k, H, W, C], got {}", i,
                              r.defined() ? shape_str(r) : "undefined"));
    if (r.size(0) == 0) continue;
    if (h < 0) {
      h = r.size(1);
      w = r.size(2);
      c = r.size(3);
    } else if (r.size(1) != h || r.size(2) != w || r.size(3) != c) {
      throw Error(fmt::format("contact_sheet: row {} has images {} but earlier rows [{}, {}, {}]", i, shape_str(r), h, w, c));
    }
    cols = std::max(cols, r.size(0));
  }
  if (cols == 0) throw Error("contact_sheet: every row is empty");
  const auto nrows = int64_t(rows.size());
  auto grid = torch::full({nrows * (h + padding) + padding, cols * (w + padding) + padding, c}, int64_t(pad_value),
                          torch::kUInt8);
  for (int64_t i = 0; i < nrows; ++i) {
    const torch::Tensor r = rows[size_t(i)].to(torch::kCPU);
    for (int64_t k = 0; k < r.size(0); ++k) put_cell(grid, r[k], i, k, padding);
  }
  return grid;
}

}  // namespace mdd
