#pragma once
// Helpers for the hand-written CPU kernels (fused ConvNet and DiT blocks). Internal.
//
// The kernels are plain loops written so that the compiler vectorises them (independent
// accumulators, no branches in inner loops). Distribution builds target baseline x86-64, so on
// GCC/Linux the hot range functions are also compiled for newer ISAs and picked at load time:
// MDD_CPU_CLONES adds Haswell (AVX2 + FMA); MDD_CPU_CLONES_AVX512 adds x86-64-v4 (AVX-512) too,
// for kernels whose rows are wide enough to fill 16 lanes.
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MDD_CPU_CLONES __attribute__((target_clones("arch=haswell", "default")))
#define MDD_CPU_CLONES_AVX512 __attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))
#else
#define MDD_CPU_CLONES
#define MDD_CPU_CLONES_AVX512
#endif
#if defined(__GNUC__)
#define MDD_INLINE inline __attribute__((always_inline))
#else
#define MDD_INLINE inline
#endif

namespace mdd::detail {

/// Independent accumulators of the reductions below (one AVX2 vector of floats).
constexpr int kLanes = 8;

/// Sum of n floats with kLanes independent accumulators (vectorisable without -ffast-math).
MDD_INLINE float lane_sum(const float* p, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) acc[k] += p[i + k];
  }
  float s = 0;
  for (; i < n; ++i) s += p[i];
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

/// Largest of n >= 1 floats, lane-wise as lane_sum (a select per lane vectorises; a running
/// scalar max does not). NaN handling is unspecified.
MDD_INLINE float lane_max(const float* p, int64_t n) {
  float acc[kLanes];
  for (int k = 0; k < kLanes; ++k) acc[k] = p[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) acc[k] = p[i + k] > acc[k] ? p[i + k] : acc[k];
  }
  float m = p[0];
  for (; i < n; ++i) m = p[i] > m ? p[i] : m;
  for (int k = 0; k < kLanes; ++k) m = acc[k] > m ? acc[k] : m;
  return m;
}

/// Sum of (p[i] - mean)^2 over n floats, as lane_sum.
MDD_INLINE float lane_sq_dev(const float* p, int64_t n, float mean) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const float d = p[i + k] - mean;
      acc[k] += d * d;
    }
  }
  float s = 0;
  for (; i < n; ++i) s += (p[i] - mean) * (p[i] - mean);
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

/// Dot product of n floats, as lane_sum.
MDD_INLINE float lane_dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) acc[k] += a[i + k] * b[i + k];
  }
  float s = 0;
  for (; i < n; ++i) s += a[i] * b[i];
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

/// bfloat16 bits -> float (exact).
MDD_INLINE float bf16_bits_to_float(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/// float -> bfloat16 bits, rounding to nearest even as c10::BFloat16 does (NaN stays NaN).
MDD_INLINE uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  // Written as a select (not a branch) so that loops over it vectorise.
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

/// exp(x) for x in float range, to about 2 ulp, in branch-free arithmetic that vectorises (libm's
/// expf does not, without -ffast-math). Inputs are clamped to [-87, 88]: below, the result is
/// the smallest normal range instead of 0 or a denormal; above, it would overflow.
MDD_INLINE float exp_approx(float x) {
  x = x < -87.0F ? -87.0F : (x > 88.0F ? 88.0F : x);
  // n = round(x / ln 2) by the 1.5 * 2^23 trick (exact in round-to-nearest; the compiler may not
  // fold (a + C) - C without -ffast-math).
  constexpr float kMagic = 12582912.0F;
  const float n = (x * 1.44269504088896341F + kMagic) - kMagic;
  // r = x - n ln 2 in two parts (Cody-Waite), |r| <= ln 2 / 2.
  const float r = (x - n * 0.693145751953125F) - n * 1.428606765330187045e-6F;
  // e^r by its Taylor series to r^6 (truncation error < 2e-7 relative on that interval).
  float p = 1.0F / 720.0F;
  p = p * r + 1.0F / 120.0F;
  p = p * r + 1.0F / 24.0F;
  p = p * r + 1.0F / 6.0F;
  p = p * r + 0.5F;
  p = p * r + 1.0F;
  p = p * r + 1.0F;
  // 2^n through the exponent bits; n lies in [-126, 127] after the clamp.
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

}  // namespace mdd::detail
