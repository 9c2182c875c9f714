#include "io/pil_resample.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <fmt/format.h>

#include "mdd/util/error.h"

namespace mdd {
namespace detail {
namespace {

// Pillow: PRECISION_BITS = 32 - 8 - 2. Taps are stored as int32 with 22 fraction bits, so a
// sum of 255 * (1 << 22) * (sum of |taps| <= ~1.3) still fits an int32 accumulator.
constexpr int kPrecisionBits = 32 - 8 - 2;

double filter_support(ResampleFilter f) {
  switch (f) {
    case ResampleFilter::Box: return 0.5;
    case ResampleFilter::Bilinear: return 1.0;
    case ResampleFilter::Bicubic: return 2.0;
  }
  return 0.0;
}

// The three kernels exactly as Pillow writes them (including the half-open BOX interval, which
// decides which source pixel a tie falls to).
double filter_value(ResampleFilter f, double x) {
  switch (f) {
    case ResampleFilter::Box:
      return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0;
    case ResampleFilter::Bilinear:
      if (x < 0.0) x = -x;
      return x < 1.0 ? 1.0 - x : 0.0;
    case ResampleFilter::Bicubic: {
      constexpr double a = -0.5;  // Pillow's choice; torch/OpenCV use -0.75
      if (x < 0.0) x = -x;
      if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
      if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
      return 0.0;
    }
  }
  return 0.0;
}

// Fixed-point taps for output positions [out_begin, out_end) of one axis.
struct Taps {
  int64_t ksize = 0;
  std::vector<int32_t> first;   // first source index per output
  std::vector<int32_t> count;   // number of taps per output
  std::vector<int32_t> coeffs;  // ksize per output, fixed point
};

Taps precompute_taps(int64_t in_size, int64_t out_size, ResampleFilter filter, int64_t out_begin, int64_t out_end) {
  // Pillow computes scale from float box coordinates; the sizes are exact in float for any real image.
  const double scale = double(float(in_size)) / double(out_size);
  const double filterscale = std::max(scale, 1.0);
  const double support = filter_support(filter) * filterscale;
  Taps t;
  t.ksize = int64_t(std::ceil(support)) * 2 + 1;
  const int64_t n = out_end - out_begin;
  t.first.resize(n);
  t.count.resize(n);
  t.coeffs.assign(size_t(n * t.ksize), 0);
  std::vector<double> w(static_cast<size_t>(t.ksize));
  const double ss = 1.0 / filterscale;  // Pillow multiplies by the reciprocal: keep it bit-identical
  for (int64_t i = 0; i < n; ++i) {
    const int64_t xx = out_begin + i;
    const double center = (double(xx) + 0.5) * scale;
    // (int) truncation as in C; negative values are clamped to 0 right after.
    int64_t xmin = int64_t(int(center - support + 0.5));
    if (xmin < 0) xmin = 0;
    int64_t xmax = int64_t(int(center + support + 0.5));
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    if (xmax > t.ksize) xmax = t.ksize;  // cannot happen (support bound); guards the buffer
    double ww = 0.0;
    for (int64_t x = 0; x < xmax; ++x) {
      const double v = filter_value(filter, (double(x + xmin) - center + 0.5) * ss);
      w[size_t(x)] = v;
      ww += v;
    }
    int32_t* k = &t.coeffs[size_t(i * t.ksize)];
    for (int64_t x = 0; x < xmax; ++x) {
      const double v = ww != 0.0 ? w[size_t(x)] / ww : w[size_t(x)];
      // normalize_coeffs_8bpc: round half away from zero via C truncation.
      k[x] = v < 0 ? int32_t(-0.5 + v * (1 << kPrecisionBits)) : int32_t(0.5 + v * (1 << kPrecisionBits));
    }
    t.first[size_t(i)] = int32_t(xmin);
    t.count[size_t(i)] = int32_t(xmax);
  }
  return t;
}

inline uint8_t clip8(int32_t v) {
  if (v >= (1 << kPrecisionBits << 8)) return 255;
  if (v <= 0) return 0;
  return uint8_t(v >> kPrecisionBits);
}

// Horizontal pass over source rows [row_begin, row_end): dst is [rows, taps.count.size(), C].
void horizontal_pass(const uint8_t* src, int64_t src_w, int64_t channels, int64_t row_begin, int64_t row_end,
                     const Taps& taps, uint8_t* dst) {
  const int64_t out_w = int64_t(taps.first.size());
  constexpr int32_t kHalf = 1 << (kPrecisionBits - 1);
  for (int64_t y = row_begin; y < row_end; ++y) {
    const uint8_t* row = src + y * src_w * channels;
    uint8_t* out = dst + (y - row_begin) * out_w * channels;
    for (int64_t xx = 0; xx < out_w; ++xx) {
      const int32_t* k = &taps.coeffs[size_t(xx * taps.ksize)];
      const uint8_t* p = row + int64_t(taps.first[size_t(xx)]) * channels;
      const int32_t n = taps.count[size_t(xx)];
      if (channels == 3) {
        int32_t s0 = kHalf, s1 = kHalf, s2 = kHalf;
        for (int32_t x = 0; x < n; ++x) {
          s0 += int32_t(p[x * 3 + 0]) * k[x];
          s1 += int32_t(p[x * 3 + 1]) * k[x];
          s2 += int32_t(p[x * 3 + 2]) * k[x];
        }
        out[xx * 3 + 0] = clip8(s0);
        out[xx * 3 + 1] = clip8(s1);
        out[xx * 3 + 2] = clip8(s2);
      } else {
        for (int64_t c = 0; c < channels; ++c) {
          int32_t s = kHalf;
          for (int32_t x = 0; x < n; ++x) s += int32_t(p[x * channels + c]) * k[x];
          out[xx * channels + c] = clip8(s);
        }
      }
    }
  }
}

// Vertical pass: src is [src_rows, width, C] whose row 0 is source row `src_row0`; dst is
// [taps.first.size(), width, C].
void vertical_pass(const uint8_t* src, int64_t width, int64_t channels, int64_t src_row0, const Taps& taps,
                   uint8_t* dst) {
  const int64_t out_h = int64_t(taps.first.size());
  const int64_t row_len = width * channels;
  constexpr int32_t kHalf = 1 << (kPrecisionBits - 1);
  std::vector<int32_t> acc(static_cast<size_t>(row_len));
  for (int64_t yy = 0; yy < out_h; ++yy) {
    const int32_t* k = &taps.coeffs[size_t(yy * taps.ksize)];
    const int64_t first = int64_t(taps.first[size_t(yy)]) - src_row0;
    const int32_t n = taps.count[size_t(yy)];
    std::fill(acc.begin(), acc.end(), kHalf);
    // Row-major accumulation: same integer sums as Pillow's per-pixel loop (integer addition is
    // exact and associative), but streams whole rows through the cache.
    for (int32_t y = 0; y < n; ++y) {
      const uint8_t* row = src + (first + y) * row_len;
      const int32_t ky = k[y];
      for (int64_t i = 0; i < row_len; ++i) acc[size_t(i)] += int32_t(row[i]) * ky;
    }
    uint8_t* out = dst + yy * row_len;
    for (int64_t i = 0; i < row_len; ++i) out[i] = clip8(acc[size_t(i)]);
  }
}

}  // namespace

torch::Tensor pil_resize_window(const torch::Tensor& image, int64_t out_w, int64_t out_h, ResampleFilter filter,
                                int64_t x0, int64_t y0, int64_t win_w, int64_t win_h) {
  const int64_t in_h = image.size(0), in_w = image.size(1), channels = image.size(2);
  if (out_w <= 0 || out_h <= 0)
    throw Error(fmt::format("resize: target size {}x{} must be positive", out_w, out_h));
  if (x0 < 0 || y0 < 0 || win_w <= 0 || win_h <= 0 || x0 + win_w > out_w || y0 + win_h > out_h)
    throw Error(fmt::format("resize: window {}x{}+{}+{} outside the {}x{} output", win_w, win_h, x0, y0, out_w, out_h));
  const uint8_t* src = image.data_ptr<uint8_t>();
  const bool need_h = out_w != in_w;
  const bool need_v = out_h != in_h;
  auto out = torch::empty({win_h, win_w, channels}, torch::kUInt8);
  uint8_t* dst = out.data_ptr<uint8_t>();

  if (!need_h && !need_v) {  // Pillow returns a copy; here: the window of the copy
    for (int64_t y = 0; y < win_h; ++y)
      std::memcpy(dst + y * win_w * channels, src + ((y0 + y) * in_w + x0) * channels, size_t(win_w * channels));
    return out;
  }
  if (need_h && !need_v) {
    const Taps th = precompute_taps(in_w, out_w, filter, x0, x0 + win_w);
    horizontal_pass(src, in_w, channels, y0, y0 + win_h, th, dst);
    return out;
  }
  const Taps tv = precompute_taps(in_h, out_h, filter, y0, y0 + win_h);
  // Source rows the vertical pass reads (Pillow's ybox_first / ybox_last, restricted to the window).
  int64_t row_first = in_h, row_last = 0;
  for (size_t i = 0; i < tv.first.size(); ++i) {
    row_first = std::min<int64_t>(row_first, tv.first[i]);
    row_last = std::max<int64_t>(row_last, int64_t(tv.first[i]) + tv.count[i]);
  }
  if (row_last <= row_first) {  // degenerate taps (cannot happen for positive sizes)
    out.zero_();
    return out;
  }
  if (!need_h) {
    // Vertical only: columns of the window are read straight from the source.
    std::vector<uint8_t> cols(static_cast<size_t>((row_last - row_first) * win_w * channels));
    for (int64_t y = row_first; y < row_last; ++y)
      std::memcpy(&cols[size_t((y - row_first) * win_w * channels)], src + (y * in_w + x0) * channels,
                  size_t(win_w * channels));
    vertical_pass(cols.data(), win_w, channels, row_first, tv, dst);
    return out;
  }
  // Both passes: horizontal first into a uint8 buffer (Pillow's imTemp: clamped and rounded).
  const Taps th = precompute_taps(in_w, out_w, filter, x0, x0 + win_w);
  std::vector<uint8_t> tmp(static_cast<size_t>((row_last - row_first) * win_w * channels));
  horizontal_pass(src, in_w, channels, row_first, row_last, th, tmp.data());
  vertical_pass(tmp.data(), win_w, channels, row_first, tv, dst);
  return out;
}

}  // namespace detail
}  // namespace mdd
