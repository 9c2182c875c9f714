#include "models/fused_dit.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <fmt/format.h>
#include <torch/torch.h>

#include "mdd/models/dit.h"
#include "mdd/util/error.h"
#include "util/cpu_kernels.h"
#include "util/torch_compat.h"

namespace mdd::detail {
namespace {

using torch::Tensor;

// Element access for float and bfloat16 (as raw bits) storage, so one always-inline template body
// serves every dtype combination.
MDD_INLINE float load(const float* p, int64_t i) { return p[i]; }
MDD_INLINE float load(const uint16_t* p, int64_t i) { return bf16_bits_to_float(p[i]); }
MDD_INLINE void store(float* p, int64_t i, float v) { p[i] = v; }
MDD_INLINE void store(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16_bits(v); }

bool is_bf16(const Tensor& t) { return t.scalar_type() == torch::kBFloat16; }
const uint16_t* bf16_ptr(const Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>()); }
uint16_t* bf16_ptr_mut(Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

// Rows per parallel chunk: about 16k floats of work each, so small tensors stay on one thread.
int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width)); }
// The same for kernels parallel over samples of `tokens` rows each.
int64_t grain_samples(int64_t tokens, int64_t width) {
  return std::max<int64_t>(1, grain_rows(width) / std::max<int64_t>(1, tokens));
}

// ------------------------------------------------------------------ LayerNorm + modulate

struct LnArgs {
  const float* x;
  const float* shift;
  const float* scale;
  int64_t mod_stride, tokens, width;
  float eps;
  float* mean_out = nullptr;  // [rows]: the statistics the backward needs (training only)
  float* rstd_out = nullptr;
};

template <typename Out>
MDD_INLINE void ln_modulate_rows(const LnArgs& a, Out* out, int64_t begin, int64_t end) {
  const int64_t D = a.width;
  const float inv_d = 1.0F / static_cast<float>(D);
  for (int64_t r = begin; r < end; ++r) {
    const float* x = a.x + r * D;
    const int64_t b = r / a.tokens;
    const float* sh = a.shift + b * a.mod_stride;
    const float* sc = a.scale + b * a.mod_stride;
    // Two passes over a row that sits in L1: the mean, then the biased variance around it.
    const float mean = lane_sum(x, D) * inv_d;
    const float rstd = 1.0F / std::sqrt(lane_sq_dev(x, D, mean) * inv_d + a.eps);
    if (a.mean_out != nullptr) {
      a.mean_out[r] = mean;
      a.rstd_out[r] = rstd;
    }
    Out* o = out + r * D;
    for (int64_t d = 0; d < D; ++d) store(o, d, (x[d] - mean) * rstd * (1.0F + sc[d]) + sh[d]);
  }
}

MDD_CPU_CLONES_AVX512 void ln_modulate_range(const LnArgs& a, float* out, int64_t begin, int64_t end) {
  ln_modulate_rows(a, out, begin, end);
}
MDD_CPU_CLONES_AVX512 void ln_modulate_range(const LnArgs& a, uint16_t* out, int64_t begin, int64_t end) {
  ln_modulate_rows(a, out, begin, end);
}

// ------------------------------------------------------------------ GELU (tanh approximation)

// 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3): one exp and one
// division, both vectorisable, instead of libm's tanh.
// (The forward, in-place and out-of-place loops stay separate: one loop over aliased pointers
// would make the compiler's overlap check send the in-place call down its scalar path.)
MDD_INLINE float gelu_u(float x) { return 0.7978845608028654F * (x + 0.044715F * x * x * x); }
MDD_INLINE float gelu_tanh(float x) { return x / (1.0F + exp_approx(-2.0F * gelu_u(x))); }

// gelu(h + bias) in place over rows [begin, end) of width W (the fc1 bias added here instead of by
// the product; zeros when there is none).
template <typename T>
MDD_INLINE void gelu_bias_rows(T* h, const float* bias, int64_t W, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    T* row = h + r * W;
    for (int64_t i = 0; i < W; ++i) store(row, i, gelu_tanh(load(row, i) + bias[i]));
  }
}
MDD_CPU_CLONES_AVX512 void gelu_bias_range(float* h, const float* bias, int64_t W, int64_t begin, int64_t end) {
  gelu_bias_rows(h, bias, W, begin, end);
}
MDD_CPU_CLONES_AVX512 void gelu_bias_range(uint16_t* h, const float* bias, int64_t W, int64_t begin, int64_t end) {
  gelu_bias_rows(h, bias, W, begin, end);
}

// ------------------------------------------------------------------ attention

struct AttnArgs {
  const float* gamma;  // [3D]: ones when the model has no DiffFit gammas
  const float* bias;   // [3D]: the qkv Linear's bias when the product left it out, else zeros
  int64_t batch, tokens, heads, head_dim;
  float scale;
  float* stats = nullptr;  // [B * heads * N, 2]: each softmax row's max and 1 / sum (training only)
};

// Register blocking of the attention kernel: kRows query rows times kCols keys (or head dims) of
// accumulators, 4 x 16 floats = four AVX-512 registers (eight AVX2 ones). The accumulators are
// GCC/Clang vector types, so each clone keeps them in its own registers (written as arrays the
// compiler spilled them to the stack); other compilers get the same arithmetic on arrays.
constexpr int64_t kRows = 4;
constexpr int64_t kCols = 16;
#if defined(__GNUC__)
// Every function taking or returning VecF is inlined into its caller's clone, so the calling
// convention GCC warns about (-Wpsabi: AVX-512 vectors passed without AVX-512) never applies.
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float VecF __attribute__((vector_size(kCols * sizeof(float))));
MDD_INLINE VecF vzero() { return VecF{}; }
MDD_INLINE VecF vload(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
MDD_INLINE void vstore(float* p, const VecF& v) { std::memcpy(p, &v, sizeof v); }
MDD_INLINE void vfma(VecF& acc, float s, const VecF& v) { acc += s * v; }
#else
struct VecF {
  float x[kCols];
};
MDD_INLINE VecF vzero() { return VecF{}; }
MDD_INLINE VecF vload(const float* p) {
  VecF v;
  std::memcpy(v.x, p, sizeof v.x);
  return v;
}
MDD_INLINE void vstore(float* p, const VecF& v) { std::memcpy(p, v.x, sizeof v.x); }
MDD_INLINE void vfma(VecF& acc, float s, const VecF& v) {
  for (int64_t c = 0; c < kCols; ++c) acc.x[c] += s * v.x[c];
}
#endif

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// C[i, 0:Np) = sum_k A[i, k] B[k, 0:Np) for i < M, with A read at A[i * ars + k * aks] (a
// transposed operand is a swap of strides) and B row-major [K, Np], Np a multiple of kCols; C has
// row stride ldc >= Np. Rows are taken kRows at a time (a block past M repeats row M - 1; those
// results are not stored), kCols columns at a time, with the accumulators in registers and k
// ascending: the attention forward and backward both use it, so the backward's recomputed scores
// equal the forward's bit for bit.
MDD_INLINE void small_gemm(const float* A, int64_t ars, int64_t aks, int64_t M, int64_t K, const float* B, int64_t Np,
                           float* C, int64_t ldc) {
  for (int64_t i0 = 0; i0 < M; i0 += kRows) {
    const int64_t rows = std::min(kRows, M - i0);
    const float* a0 = A + std::min(i0 + 0, M - 1) * ars;
    const float* a1 = A + std::min(i0 + 1, M - 1) * ars;
    const float* a2 = A + std::min(i0 + 2, M - 1) * ars;
    const float* a3 = A + std::min(i0 + 3, M - 1) * ars;
    for (int64_t j0 = 0; j0 < Np; j0 += kCols) {
      VecF c0 = vzero(), c1 = vzero(), c2 = vzero(), c3 = vzero();
      for (int64_t k = 0; k < K; ++k) {
        const VecF b = vload(B + k * Np + j0);
        vfma(c0, a0[k * aks], b);
        vfma(c1, a1[k * aks], b);
        vfma(c2, a2[k * aks], b);
        vfma(c3, a3[k * aks], b);
      }
      vstore(C + (i0 + 0) * ldc + j0, c0);
      if (rows > 1) vstore(C + (i0 + 1) * ldc + j0, c1);
      if (rows > 2) vstore(C + (i0 + 2) * ldc + j0, c2);
      if (rows > 3) vstore(C + (i0 + 3) * ldc + j0, c3);
    }
  }
}

// Floats of scratch one task needs (see attention_tasks).
int64_t attention_scratch(int64_t N, int64_t hd) {
  return N * hd + round_up(N, kCols) * hd + N * round_up(hd, kCols) + kRows * round_up(N, kCols) +
         kRows * round_up(hd, kCols);
}

// One (sample, head) per task. q (scaled), k^T and v are gathered into float buffers, zero-padded
// to whole kCols blocks so that the inner loops have a fixed width the compiler turns into whole
// vectors. Scores and output come from small_gemm, kRows query rows at a time: scores, soft-max
// per row, the output accumulated and scaled by 1 / sum.
template <typename In, typename Out>
MDD_INLINE void attention_tasks(const AttnArgs& a, const In* qkv, Out* out, float* buf, int64_t begin, int64_t end) {
  const int64_t N = a.tokens, hd = a.head_dim, D = a.heads * hd, row = 3 * D;
  const int64_t Np = round_up(N, kCols), hdp = round_up(hd, kCols);
  float* Q = buf;           // [N, hd]
  float* Kt = Q + N * hd;   // [hd, Np], zero columns past N
  float* V = Kt + hd * Np;  // [N, hdp], zero columns past hd
  float* S = V + N * hdp;   // [kRows, Np]
  float* O = S + kRows * Np;  // [kRows, hdp]
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / a.heads, h = task % a.heads;
    const In* base = qkv + b * N * row;
    const int64_t cq = h * hd, ck = D + h * hd, cv = 2 * D + h * hd;
    const float* gq = a.gamma + cq;
    const float* gk = a.gamma + ck;
    const float* gv = a.gamma + cv;
    const float* bq = a.bias + cq;
    const float* bk = a.bias + ck;
    const float* bv = a.bias + cv;
    for (int64_t d = 0; d < hd; ++d)
      for (int64_t n = N; n < Np; ++n) Kt[d * Np + n] = 0.0F;
    // Three loops, not one: q and v rows are contiguous copies that vectorise; only k^T is a
    // transposing (scalar) store.
    for (int64_t n = 0; n < N; ++n) {
      const In* r = base + n * row;
      float* qn = Q + n * hd;
      for (int64_t d = 0; d < hd; ++d) qn[d] = (gq[d] * (load(r, cq + d) + bq[d])) * a.scale;
      float* vn = V + n * hdp;
      for (int64_t d = 0; d < hd; ++d) vn[d] = gv[d] * (load(r, cv + d) + bv[d]);
      for (int64_t d = hd; d < hdp; ++d) vn[d] = 0.0F;
    }
    for (int64_t n = 0; n < N; ++n) {
      const In* r = base + n * row + ck;
      for (int64_t d = 0; d < hd; ++d) Kt[d * Np + n] = gk[d] * (load(r, d) + bk[d]);
    }
    for (int64_t i0 = 0; i0 < N; i0 += kRows) {
      const int64_t rows = std::min(kRows, N - i0);
      small_gemm(Q + i0 * hd, hd, 1, rows, hd, Kt, Np, S, Np);  // scores
      float inv[kRows];
      for (int64_t r = 0; r < rows; ++r) {
        float* s = S + r * Np;
        const float m = lane_max(s, N);
        for (int64_t j = 0; j < N; ++j) s[j] = exp_approx(s[j] - m);
        inv[r] = 1.0F / lane_sum(s, N);
        if (a.stats != nullptr) {
          a.stats[(task * N + i0 + r) * 2] = m;
          a.stats[(task * N + i0 + r) * 2 + 1] = inv[r];
        }
      }
      small_gemm(S, Np, 1, rows, N, V, hdp, O, hdp);  // unnormalised output
      for (int64_t r = 0; r < rows; ++r) {
        Out* dst = out + (b * N + i0 + r) * D + h * hd;
        for (int64_t c = 0; c < hd; ++c) store(dst, c, O[r * hdp + c] * inv[r]);
      }
    }
  }
}

MDD_CPU_CLONES_AVX512 void attention_range(const AttnArgs& a, const float* qkv, float* out, float* buf, int64_t begin,
                                           int64_t end) {
  attention_tasks(a, qkv, out, buf, begin, end);
}
MDD_CPU_CLONES_AVX512 void attention_range(const AttnArgs& a, const uint16_t* qkv, uint16_t* out, float* buf,
                                           int64_t begin, int64_t end) {
  attention_tasks(a, qkv, out, buf, begin, end);
}

// ---- bf16 dot-product attention (inference, CPUs with AVX512_BF16)
//
// In bf16 mode the kernel above still multiplies in float32: its products run at the float FMA
// rate. CPUs with AVX512_BF16 multiply bf16 pairs into float32 accumulators (vdpbf16ps) at twice
// that rate, which is what the bf16 autocast matmuls of the module path do too: q (scaled), k and
// v rounded to bf16, the soft-max in float32, its probabilities rounded to bf16 for the product
// with v. Used for inference only: the training path recomputes the forward's probabilities bit
// for bit in its backward, which is written for the float32 kernel.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 10
#define MDD_BF16_DOT_ATTENTION 1
}  // namespace
}  // namespace mdd::detail
#include <immintrin.h>
namespace mdd::detail {
namespace {

#define MDD_TARGET_BF16_DOT __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")))

// Scratch of one task in 32-bit words (see attention_dot_range).
int64_t attention_dot_scratch(int64_t N, int64_t hd) {
  const int64_t Np = round_up(N, kCols), hdp = round_up(hd, kCols), Nh = (N + 1) / 2;
  return round_up(N, kRows) * (hd / 2) + (hd / 2) * Np + Nh * hdp + kRows * Np + kRows * Nh;
}

// For rows r < 4 and NB (1 or 2) column blocks of 16: C[r][16k + c] = sum_p A32[r][p] . B[p][16k + c]
// in bf16 pairs (A32 row r: bf16 pairs read as 32-bit words, stride lda; B: [P][ldb] words), then
// emit(r, k, C block). The accumulators are named locals, not an array, so they stay in registers
// (an array was kept on the stack). Two blocks give eight independent chains.
template <int NB, typename Emit>
MDD_TARGET_BF16_DOT MDD_INLINE void dot_rows4(const uint32_t* A32, int64_t lda, int64_t P, const uint32_t* B,
                                              int64_t ldb, Emit&& emit) {
  __m512 c00 = _mm512_setzero_ps(), c10 = c00, c20 = c00, c30 = c00;
  __m512 c01 = c00, c11 = c00, c21 = c00, c31 = c00;
  const uint32_t *a0 = A32, *a1 = A32 + lda, *a2 = A32 + 2 * lda, *a3 = A32 + 3 * lda;
  for (int64_t p = 0; p < P; ++p) {
    const uint32_t* bp = B + p * ldb;
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp);
    const __m512bh x0 = (__m512bh)_mm512_set1_epi32(static_cast<int>(a0[p]));
    const __m512bh x1 = (__m512bh)_mm512_set1_epi32(static_cast<int>(a1[p]));
    const __m512bh x2 = (__m512bh)_mm512_set1_epi32(static_cast<int>(a2[p]));
    const __m512bh x3 = (__m512bh)_mm512_set1_epi32(static_cast<int>(a3[p]));
    c00 = _mm512_dpbf16_ps(c00, x0, b0);
    c10 = _mm512_dpbf16_ps(c10, x1, b0);
    c20 = _mm512_dpbf16_ps(c20, x2, b0);
    c30 = _mm512_dpbf16_ps(c30, x3, b0);
    if (NB > 1) {
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + 16);
      c01 = _mm512_dpbf16_ps(c01, x0, b1);
      c11 = _mm512_dpbf16_ps(c11, x1, b1);
      c21 = _mm512_dpbf16_ps(c21, x2, b1);
      c31 = _mm512_dpbf16_ps(c31, x3, b1);
    }
  }
  emit(0, 0, c00);
  emit(1, 0, c10);
  emit(2, 0, c20);
  emit(3, 0, c30);
  if (NB > 1) {
    emit(0, 1, c01);
    emit(1, 1, c11);
    emit(2, 1, c21);
    emit(3, 1, c31);
  }
}

// exp_approx on 16 lanes (the same steps, with fused multiply-adds).
MDD_TARGET_BF16_DOT MDD_INLINE __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0F)), _mm512_set1_ps(88.0F));
  const __m512 magic = _mm512_set1_ps(12582912.0F);
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341F), magic), magic);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125F), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-6F), r);
  __m512 p = _mm512_set1_ps(1.0F / 720.0F);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0F / 120.0F));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0F / 24.0F));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0F / 6.0F));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5F));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0F));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0F));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

// dot_rows4 over columns [0, width) (a multiple of 16): two blocks at a time, then one; emit(r, j, C)
// gets each 16-wide block at its first column j.
template <typename Emit>
MDD_TARGET_BF16_DOT MDD_INLINE void dot_rows4_across(const uint32_t* A32, int64_t lda, int64_t P, const uint32_t* B,
                                                     int64_t ldb, int64_t width, Emit&& emit) {
  for (int64_t j0 = 0; j0 < width;) {
    auto at = [&](int64_t r, int64_t k, __m512 c) MDD_TARGET_BF16_DOT { emit(r, j0 + k * kCols, c); };
    if (j0 + 2 * kCols <= width) {
      dot_rows4<2>(A32, lda, P, B + j0, ldb, at);
      j0 += 2 * kCols;
    } else {
      dot_rows4<1>(A32, lda, P, B + j0, ldb, at);
      j0 += kCols;
    }
  }
}

// Lanes [0, n) of 16 (n <= 16).
MDD_INLINE __mmask16 lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }

// (x + bias) * gamma * scale for 16 channels from bf16 storage, rounded to bf16 (round to nearest
// even, as float_to_bf16_bits; the instruction flushes denormals, harmless here). Lanes off the
// mask read nothing and give zero.
MDD_TARGET_BF16_DOT MDD_INLINE __m256i scaled_bf16x16(const uint16_t* x, const float* bias, const float* gamma,
                                                      float scale, __mmask16 m) {
  const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, x)), 16));
  const __m512 f = _mm512_mul_ps(_mm512_mul_ps(_mm512_add_ps(v, _mm512_maskz_loadu_ps(m, bias)),
                                               _mm512_maskz_loadu_ps(m, gamma)),
                                 _mm512_set1_ps(scale));
  return (__m256i)_mm512_cvtneps_pbh(f);
}

// One (sample, head) per task, as attention_tasks; head_dim even. Layouts (32-bit words, each a
// pair of bf16): Q [N rounded up to kRows][hd/2] (pairs along d), K [hd/2][Np] (pairs along d,
// key-major inside), V [ceil(N/2)][hdp] (pairs along keys), probabilities [kRows][ceil(N/2)]
// (pairs along keys). Padding words are zero, so padded keys and dims contribute exact zeros.
MDD_TARGET_BF16_DOT void attention_dot_range(const AttnArgs& a, const uint16_t* qkv, uint16_t* out, uint32_t* buf,
                                             int64_t begin, int64_t end) {
  const int64_t N = a.tokens, hd = a.head_dim, D = a.heads * hd, row = 3 * D;
  const int64_t Np = round_up(N, kCols), hdp = round_up(hd, kCols), Nh = (N + 1) / 2, H2 = hd / 2;
  const int64_t Nr = round_up(N, kRows);
  uint32_t* Q = buf;                                          // [Nr][H2]
  uint32_t* K = Q + Nr * H2;                                  // [H2][Np]
  uint32_t* V = K + H2 * Np;                                  // [Nh][hdp]
  float* S = reinterpret_cast<float*>(V + Nh * hdp);          // [kRows][Np]
  uint32_t* P = reinterpret_cast<uint32_t*>(S + kRows * Np);  // [kRows][Nh]
  // Every padding word is zero once here; the tasks write only the others.
  std::memset(buf, 0, sizeof(uint32_t) * static_cast<size_t>(attention_dot_scratch(N, hd)));
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / a.heads, h = task % a.heads;
    const uint16_t* base = qkv + b * N * row;
    const int64_t cq = h * hd, ck = D + h * hd, cv = 2 * D + h * hd;
    const float *gq = a.gamma + cq, *gk = a.gamma + ck, *gv = a.gamma + cv;
    const float *bq = a.bias + cq, *bk = a.bias + ck, *bv = a.bias + cv;
    // A row of q (or k) in bf16 is a row of d-pairs already: q is stored as is, k's words are then
    // transposed to key-major (32-bit moves). v rows are interleaved two by two into key pairs.
    for (int64_t n = 0; n < N; ++n) {
      const uint16_t* r = base + n * row;
      uint16_t* qn = reinterpret_cast<uint16_t*>(Q + n * H2);
      for (int64_t d = 0; d < hd; d += kCols) {
        const __mmask16 m = lanes(std::min(kCols, hd - d));
        _mm256_mask_storeu_epi16(qn + d, m, scaled_bf16x16(r + cq + d, bq + d, gq + d, a.scale, m));
        // k's pairs go to K[p][n], p = d/2 ...: a scatter from the register (reading them back
        // from a staging store would stall on store-to-load forwarding).
        const __m256i kb = scaled_bf16x16(r + ck + d, bk + d, gk + d, 1.0F, m);
        const __m256i idx = _mm256_mullo_epi32(_mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(d / 2)),
                                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                                               _mm256_set1_epi32(static_cast<int>(Np)));
        _mm256_mask_i32scatter_epi32(K + n, static_cast<__mmask8>(lanes(std::min(kCols, hd - d) / 2)), idx, kb, 4);
      }
    }
    for (int64_t jp = 0; jp < Nh; ++jp) {
      const uint16_t* r0 = base + (2 * jp) * row + cv;
      const bool pair = 2 * jp + 1 < N;
      uint32_t* vp = V + jp * hdp;
      for (int64_t d = 0; d < hd; d += kCols) {
        const __mmask16 m = lanes(std::min(kCols, hd - d));
        const __m512i lo = _mm512_cvtepu16_epi32(scaled_bf16x16(r0 + d, bv + d, gv + d, 1.0F, m));
        const __m512i hi = pair ? _mm512_cvtepu16_epi32(scaled_bf16x16(r0 + row + d, bv + d, gv + d, 1.0F, m))
                                : _mm512_setzero_si512();
        _mm512_mask_storeu_epi32(vp + d, m, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
    for (int64_t i0 = 0; i0 < N; i0 += kRows) {
      const int64_t rows = std::min(kRows, N - i0);
      // The last block may run past N into Q's zero rows; those results are not used.
      const uint32_t* A = Q + i0 * H2;
      dot_rows4_across(A, H2, H2, K, Np, Np, [&](int64_t r, int64_t j, __m512 c) MDD_TARGET_BF16_DOT {
        if (r < rows) _mm512_storeu_ps(S + r * Np + j, c);
      });
      float inv[kRows];
      for (int64_t r = 0; r < rows; ++r) {
        // In registers of 16 (the scores were just stored as such; scalar reads of them would
        // stall on store-to-load forwarding). Keys past N are masked out.
        const float* s = S + r * Np;
        __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        for (int64_t j = 0; j < N; j += kCols)
          mx = _mm512_mask_max_ps(mx, lanes(std::min(kCols, N - j)), mx, _mm512_loadu_ps(s + j));
        const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        // The bf16 row of probabilities is its row of key pairs; an odd N's last pair gets a zero.
        uint16_t* pr = reinterpret_cast<uint16_t*>(P + r * Nh);
        for (int64_t j = 0; j < 2 * Nh; j += kCols) {
          const __mmask16 mv = lanes(std::max<int64_t>(0, std::min(kCols, N - j)));
          const __m512 e = _mm512_maskz_mov_ps(mv, exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), m)));
          sum = _mm512_add_ps(sum, e);
          _mm256_mask_storeu_epi16(pr + j, lanes(std::min(kCols, 2 * Nh - j)), (__m256i)_mm512_cvtneps_pbh(e));
        }
        inv[r] = 1.0F / _mm512_reduce_add_ps(sum);
      }
      dot_rows4_across(P, Nh, Nh, V, hdp, hdp, [&](int64_t r, int64_t d, __m512 c) MDD_TARGET_BF16_DOT {
        if (r >= rows || d >= hd) return;
        const __m256i o = (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(c, _mm512_set1_ps(inv[r])));
        _mm256_mask_storeu_epi16(out + (b * N + i0 + r) * D + h * hd + d, lanes(std::min(kCols, hd - d)), o);
      });
    }
  }
}

bool cpu_has_bf16_dot() {
  static const bool has = __builtin_cpu_supports("avx512bf16") != 0;
  return has;
}
#else
bool cpu_has_bf16_dot() { return false; }
#endif

std::atomic<bool> g_bf16_dot_attention{true};

// ------------------------------------------------------------------ gated residual

struct ResArgs {
  const float* x;
  const float* gate;
  const float* outer;  // [D]: ones when absent
  const float* inner;  // [D]: ones when absent
  const float* bias;   // [D]: the producing Linear's bias when the product left it out, else zeros
  int64_t gate_stride, tokens, width;
};

template <typename A>
MDD_INLINE void residual_rows(const ResArgs& r, const A* a, float* out, int64_t begin, int64_t end) {
  const int64_t D = r.width;
  for (int64_t row = begin; row < end; ++row) {
    const float* x = r.x + row * D;
    const float* g = r.gate + (row / r.tokens) * r.gate_stride;
    const A* ar = a + row * D;
    float* o = out + row * D;
    // The module path's op order: x + (gamma1 * gate) * (gamma2 * (a + bias)).
    for (int64_t d = 0; d < D; ++d) o[d] = x[d] + (r.outer[d] * g[d]) * (r.inner[d] * (load(ar, d) + r.bias[d]));
  }
}

MDD_CPU_CLONES_AVX512 void residual_range(const ResArgs& r, const float* a, float* out, int64_t begin, int64_t end) {
  residual_rows(r, a, out, begin, end);
}
MDD_CPU_CLONES_AVX512 void residual_range(const ResArgs& r, const uint16_t* a, float* out, int64_t begin,
                                          int64_t end) {
  residual_rows(r, a, out, begin, end);
}

// ------------------------------------------------------------------ backward kernels (training)
//
// The training path runs the same forward kernels (which then also keep LayerNorm's mean and
// rstd and each softmax row's max and 1 / sum) and these backward kernels, wrapped as autograd
// functions below. Each backward reads the forward's saved inputs, so nothing of the module
// path's chain of elementwise intermediates is kept alive between forward and backward.

// LayerNorm + modulate backward, one sample per task (its shift/scale gradients are sums over
// that sample's tokens, so tasks never share an output). With h = (x - mean) * rstd and
// g' = g * (1 + scale): dx = rstd * (g' - mean(g') - h * mean(g' h)), dshift = sum g,
// dscale = sum g h.
struct LnBackArgs {
  const float* x;
  const float* mean;
  const float* rstd;
  const float* scale;
  int64_t mod_stride, tokens, width;
  float* dx;
  float* dshift;  // [B, D]
  float* dscale;  // [B, D]
};

template <typename G>
MDD_INLINE void ln_modulate_back_samples(const LnBackArgs& a, const G* g, float* buf, int64_t begin, int64_t end) {
  const int64_t D = a.width, N = a.tokens;
  const float inv_d = 1.0F / static_cast<float>(D);
  float* xh = buf;
  float* gh = buf + D;
  for (int64_t b = begin; b < end; ++b) {
    const float* sc = a.scale + b * a.mod_stride;
    float* dsh = a.dshift + b * D;
    float* dsc = a.dscale + b * D;
    for (int64_t d = 0; d < D; ++d) dsh[d] = dsc[d] = 0.0F;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t r = b * N + n;
      const float* x = a.x + r * D;
      const G* gr = g + r * D;
      const float mean = a.mean[r], rstd = a.rstd[r];
      for (int64_t d = 0; d < D; ++d) {
        const float h = (x[d] - mean) * rstd;
        const float gd = load(gr, d);
        dsh[d] += gd;
        dsc[d] += gd * h;
        xh[d] = h;
        gh[d] = gd * (1.0F + sc[d]);
      }
      const float m1 = lane_sum(gh, D) * inv_d, m2 = lane_dot(gh, xh, D) * inv_d;
      float* dx = a.dx + r * D;
      for (int64_t d = 0; d < D; ++d) dx[d] = rstd * (gh[d] - m1 - xh[d] * m2);
    }
  }
}

MDD_CPU_CLONES_AVX512 void ln_modulate_back_range(const LnBackArgs& a, const float* g, float* buf, int64_t begin,
                                                  int64_t end) {
  ln_modulate_back_samples(a, g, buf, begin, end);
}
MDD_CPU_CLONES_AVX512 void ln_modulate_back_range(const LnBackArgs& a, const uint16_t* g, float* buf, int64_t begin,
                                                  int64_t end) {
  ln_modulate_back_samples(a, g, buf, begin, end);
}

// Gated residual backward, one sample per task: da = g * (outer * gate) * inner in a's dtype, and
// t[b] = sum over the sample's tokens of g * a, from which the gate and gamma gradients follow as
// small [B, D] products.
struct ResBackArgs {
  const float* gate;
  const float* outer;
  const float* inner;
  int64_t gate_stride, tokens, width;
  float* t;  // [B, D]
};

template <typename A>
MDD_INLINE void residual_back_samples(const ResBackArgs& r, const float* g, const A* a, A* da, int64_t begin,
                                      int64_t end) {
  const int64_t D = r.width, N = r.tokens;
  for (int64_t b = begin; b < end; ++b) {
    const float* gt = r.gate + b * r.gate_stride;
    float* t = r.t + b * D;
    for (int64_t d = 0; d < D; ++d) t[d] = 0.0F;
    for (int64_t n = 0; n < N; ++n) {
      const int64_t off = (b * N + n) * D;
      for (int64_t d = 0; d < D; ++d) {
        const float gd = g[off + d];
        t[d] += gd * load(a, off + d);
        store(da, off + d, gd * (r.outer[d] * gt[d]) * r.inner[d]);
      }
    }
  }
}

MDD_CPU_CLONES_AVX512 void residual_back_range(const ResBackArgs& r, const float* g, const float* a, float* da,
                                               int64_t begin, int64_t end) {
  residual_back_samples(r, g, a, da, begin, end);
}
MDD_CPU_CLONES_AVX512 void residual_back_range(const ResBackArgs& r, const float* g, const uint16_t* a, uint16_t* da,
                                               int64_t begin, int64_t end) {
  residual_back_samples(r, g, a, da, begin, end);
}

// GELU (tanh) out of place, and its derivative: with s = 1 / (1 + exp(-2u)), gelu = x s and
// gelu' = s + x * 2 s (1 - s) * u', u' = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
template <typename T>
MDD_INLINE void gelu_out_elems(const T* x, T* y, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) store(y, i, gelu_tanh(load(x, i)));
}

template <typename T>
MDD_INLINE void gelu_back_elems(const T* x, const T* g, T* dx, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float v = load(x, i);
    const float s = 1.0F / (1.0F + exp_approx(-2.0F * gelu_u(v)));
    const float du = 0.7978845608028654F * (1.0F + 3.0F * 0.044715F * v * v);
    store(dx, i, load(g, i) * (s + v * 2.0F * s * (1.0F - s) * du));
  }
}

MDD_CPU_CLONES_AVX512 void gelu_out_range(const float* x, float* y, int64_t b, int64_t e) { gelu_out_elems(x, y, b, e); }
MDD_CPU_CLONES_AVX512 void gelu_out_range(const uint16_t* x, uint16_t* y, int64_t b, int64_t e) {
  gelu_out_elems(x, y, b, e);
}
MDD_CPU_CLONES_AVX512 void gelu_back_range(const float* x, const float* g, float* dx, int64_t b, int64_t e) {
  gelu_back_elems(x, g, dx, b, e);
}
MDD_CPU_CLONES_AVX512 void gelu_back_range(const uint16_t* x, const uint16_t* g, uint16_t* dx, int64_t b, int64_t e) {
  gelu_back_elems(x, g, dx, b, e);
}

// Floats of scratch one backward task needs (see attention_back_tasks).
int64_t attention_back_scratch(int64_t N, int64_t hd) {
  const int64_t Np = round_up(N, kCols), hdp = round_up(hd, kCols);
  return 6 * N * hdp + 2 * hd * Np + 2 * N * Np;
}

// Attention backward per (sample, head). P is recomputed from q, k and the forward's row max and
// 1 / sum (identical scores, see small_gemm); then dV = P^T dO, dP = dO V^T,
// dS = P (dP - rowsum(P dP)), dQ = dS K, dK = dS^T Q, written into dqkv's q/k/v channels of the
// head (times DiffFit's gamma1 and the score scale) and, for gamma1's gradient, sum(raw * grad)
// into the task's own slice of dgamma [B, 3D] (heads own disjoint channels: no sharing).
struct AttnBackArgs {
  const float* gamma;
  const float* stats;
  int64_t batch, tokens, heads, head_dim;
  float scale;
  float* dgamma;  // [B, 3D]
};

template <typename T>
MDD_INLINE void attention_back_tasks(const AttnBackArgs& a, const T* qkv, const T* dout, T* dqkv, float* buf,
                                     int64_t begin, int64_t end) {
  const int64_t N = a.tokens, hd = a.head_dim, D = a.heads * hd, row = 3 * D;
  const int64_t Np = round_up(N, kCols), hdp = round_up(hd, kCols);
  float* Qs = buf;            // [N, hdp] scaled q (gamma1 applied), zero columns past hd
  float* Kp = Qs + N * hdp;   // [N, hdp]
  float* dO = Kp + N * hdp;   // [N, hdp]
  float* dQ = dO + N * hdp;   // [N, hdp]
  float* dK = dQ + N * hdp;   // [N, hdp]
  float* dV = dK + N * hdp;   // [N, hdp]
  float* Kt = dV + N * hdp;   // [hd, Np], zero columns past N
  float* Vt = Kt + hd * Np;   // [hd, Np]
  float* P = Vt + hd * Np;    // [N, Np]
  float* dS = P + N * Np;     // [N, Np]
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / a.heads, h = task % a.heads;
    const T* base = qkv + b * N * row;
    const T* gbase = dout + b * N * D + h * hd;
    const int64_t cq = h * hd, ck = D + h * hd, cv = 2 * D + h * hd;
    const float* gq = a.gamma + cq;
    const float* gk = a.gamma + ck;
    const float* gv = a.gamma + cv;
    std::fill(Qs, Qs + 3 * N * hdp, 0.0F);  // Qs, Kp, dO padding
    std::fill(Kt, Kt + 2 * hd * Np, 0.0F);  // Kt, Vt padding
    for (int64_t n = 0; n < N; ++n) {
      const T* r = base + n * row;
      for (int64_t d = 0; d < hd; ++d) Qs[n * hdp + d] = (gq[d] * load(r, cq + d)) * a.scale;
      for (int64_t d = 0; d < hd; ++d) Kp[n * hdp + d] = gk[d] * load(r, ck + d);
      for (int64_t d = 0; d < hd; ++d) dO[n * hdp + d] = load(gbase + n * D, d);
    }
    for (int64_t n = 0; n < N; ++n) {
      const T* r = base + n * row;
      for (int64_t d = 0; d < hd; ++d) Kt[d * Np + n] = Kp[n * hdp + d];
      for (int64_t d = 0; d < hd; ++d) Vt[d * Np + n] = gv[d] * load(r, cv + d);
    }
    small_gemm(Qs, hdp, 1, N, hd, Kt, Np, P, Np);  // scores
    const float* st = a.stats + task * N * 2;
    for (int64_t i = 0; i < N; ++i) {
      float* p = P + i * Np;
      const float m = st[2 * i], inv = st[2 * i + 1];
      for (int64_t j = 0; j < N; ++j) p[j] = exp_approx(p[j] - m) * inv;
      for (int64_t j = N; j < Np; ++j) p[j] = 0.0F;
    }
    small_gemm(dO, hdp, 1, N, hd, Vt, Np, dS, Np);  // dP
    for (int64_t i = 0; i < N; ++i) {
      const float* p = P + i * Np;
      float* ds = dS + i * Np;
      const float delta = lane_dot(p, ds, N);
      for (int64_t j = 0; j < N; ++j) ds[j] = p[j] * (ds[j] - delta);
    }
    small_gemm(P, 1, Np, N, N, dO, hdp, dV, hdp);   // P^T dO
    small_gemm(dS, Np, 1, N, N, Kp, hdp, dQ, hdp);  // dS K
    small_gemm(dS, 1, Np, N, N, Qs, hdp, dK, hdp);  // dS^T Q
    float* dgq = a.dgamma + b * row + cq;
    float* dgk = a.dgamma + b * row + ck;
    float* dgv = a.dgamma + b * row + cv;
    for (int64_t n = 0; n < N; ++n) {
      const T* r = base + n * row;
      T* o = dqkv + (b * N + n) * row;
      for (int64_t d = 0; d < hd; ++d) {
        const float dq = dQ[n * hdp + d] * a.scale;  // gradient of gamma1 * q
        store(o, cq + d, dq * gq[d]);
        dgq[d] += dq * load(r, cq + d);
      }
      for (int64_t d = 0; d < hd; ++d) {
        const float dk = dK[n * hdp + d];
        store(o, ck + d, dk * gk[d]);
        dgk[d] += dk * load(r, ck + d);
      }
      for (int64_t d = 0; d < hd; ++d) {
        const float dv = dV[n * hdp + d];
        store(o, cv + d, dv * gv[d]);
        dgv[d] += dv * load(r, cv + d);
      }
    }
  }
}

MDD_CPU_CLONES_AVX512 void attention_back_range(const AttnBackArgs& a, const float* qkv, const float* dout, float* dqkv,
                                                float* buf, int64_t begin, int64_t end) {
  attention_back_tasks(a, qkv, dout, dqkv, buf, begin, end);
}
MDD_CPU_CLONES_AVX512 void attention_back_range(const AttnBackArgs& a, const uint16_t* qkv, const uint16_t* dout,
                                                uint16_t* dqkv, float* buf, int64_t begin, int64_t end) {
  attention_back_tasks(a, qkv, dout, dqkv, buf, begin, end);
}

// ------------------------------------------------------------------ checks and helpers

void check_cpu_contiguous(const Tensor& t, const char* what, const char* name) {
  MDD_CHECK(t.defined() && t.device().is_cpu() && t.is_contiguous(),
            fmt::format("{}: {} must be a contiguous CPU tensor", what, name));
}

void check_rows(const Tensor& t, int64_t B, int64_t D, const char* what, const char* name) {
  MDD_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.dim() == 2 &&
                t.size(0) == B && t.size(1) == D && t.stride(1) == 1,
            fmt::format("{}: {} must be float [{}, {}] with unit inner stride", what, name, B, D));
}

// Per-channel values as a float pointer: the tensor's data, or `fill` when it is undefined (ones
// for absent factors, zeros for an absent bias, so the kernels need no branch for either).
const float* channels_or(const Tensor& t, int64_t n, float fill, std::vector<float>& storage, Tensor& keep,
                         const char* what) {
  if (!t.defined()) {
    storage.assign(static_cast<size_t>(n), fill);
    return storage.data();
  }
  MDD_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.numel() == n,
            fmt::format("{}: per-channel factors and biases must be float CPU [{}]", what, n));
  keep = t.contiguous();
  return keep.data_ptr<float>();
}
const float* factors_or_ones(const Tensor& t, int64_t n, std::vector<float>& ones, Tensor& keep, const char* what) {
  return channels_or(t, n, 1.0F, ones, keep, what);
}
const float* bias_or_zeros(const Tensor& t, int64_t n, std::vector<float>& zeros, Tensor& keep, const char* what) {
  return channels_or(t, n, 0.0F, zeros, keep, what);
}

// Linear(in2d) in the mode's precision: bf16 weights and activations (bf16 out) or float32. The
// weights go through autocast's own cast cache, as the module path's Linear does, so a caller that
// keeps one autocast region open over many forwards casts each weight once.
Tensor linear_in(const Tensor& in2d, const torch::nn::Linear& l, bool bf16, bool with_bias = true) {
  Tensor w = l->weight, b = with_bias ? l->bias : Tensor();
  if (bf16) {
    w = at::autocast::cached_cast(torch::kBFloat16, w, c10::DeviceType::CPU);
    if (b.defined()) b = at::autocast::cached_cast(torch::kBFloat16, b, c10::DeviceType::CPU);
  }
  return b.defined() ? at::addmm(b, in2d, w.t()) : at::mm(in2d, w.t());
}

}  // namespace

namespace {
// The mode the tensors and the autocast state allow, whatever the grad mode.
FusedDiTMode cpu_float_mode(const Tensor& x, const Tensor& w) {
  if (!x.defined() || !w.defined() || x.dim() != 3 || !x.device().is_cpu() || !w.device().is_cpu())
    return FusedDiTMode::kNone;
  if (x.scalar_type() != torch::kFloat32 || w.scalar_type() != torch::kFloat32) return FusedDiTMode::kNone;
  if (!compat::autocast_enabled(c10::DeviceType::CPU)) return FusedDiTMode::kFP32;
  return compat::autocast_dtype(c10::DeviceType::CPU) == torch::kBFloat16 ? FusedDiTMode::kBF16 : FusedDiTMode::kNone;
}
}  // namespace

FusedDiTMode fused_dit_mode(const Tensor& x, const Tensor& w) {
  return torch::GradMode::is_enabled() ? FusedDiTMode::kNone : cpu_float_mode(x, w);
}

namespace {

// ln_modulate; with `mean`/`rstd` (float [B * N]) defined it also keeps the row statistics.
Tensor ln_modulate_impl(const Tensor& x_in, const Tensor& shift, const Tensor& scale, double eps,
                        torch::ScalarType out_dtype, Tensor* mean, Tensor* rstd) {
  constexpr const char* what = "ln_modulate";
  MDD_CHECK(x_in.defined() && x_in.dim() == 3 && x_in.scalar_type() == torch::kFloat32 && x_in.device().is_cpu(),
            "ln_modulate: x must be a float CPU tensor [B, N, D]");
  MDD_CHECK(out_dtype == torch::kFloat32 || out_dtype == torch::kBFloat16, "ln_modulate: out_dtype must be float or bfloat16");
  const Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  check_rows(shift, B, D, what, "shift");
  check_rows(scale, B, D, what, "scale");
  MDD_CHECK(shift.stride(0) == scale.stride(0), "ln_modulate: shift and scale must share a row stride");
  Tensor out = torch::empty({B, N, D}, x.options().dtype(out_dtype));
  LnArgs a{x.data_ptr<float>(), shift.data_ptr<float>(), scale.data_ptr<float>(), shift.stride(0), N, D,
           static_cast<float>(eps)};
  if (mean != nullptr) {
    *mean = torch::empty({B * N}, x.options());
    *rstd = torch::empty({B * N}, x.options());
    a.mean_out = mean->data_ptr<float>();
    a.rstd_out = rstd->data_ptr<float>();
  }
  if (out_dtype == torch::kBFloat16) {
    uint16_t* o = bf16_ptr_mut(out);
    at::parallel_for(0, B * N, grain_rows(D), [&](int64_t b, int64_t e) { ln_modulate_range(a, o, b, e); });
  } else {
    float* o = out.data_ptr<float>();
    at::parallel_for(0, B * N, grain_rows(D), [&](int64_t b, int64_t e) { ln_modulate_range(a, o, b, e); });
  }
  return out;
}

}  // namespace

Tensor ln_modulate(const Tensor& x, const Tensor& shift, const Tensor& scale, double eps, torch::ScalarType out_dtype) {
  return ln_modulate_impl(x, shift, scale, eps, out_dtype, nullptr, nullptr);
}

Tensor gelu_tanh_(Tensor h, const Tensor& bias) {
  check_cpu_contiguous(h, "gelu_tanh_", "h");
  MDD_CHECK(is_bf16(h) || h.scalar_type() == torch::kFloat32, "gelu_tanh_: h must be float or bfloat16");
  const int64_t n = h.numel();
  if (n == 0) return h;
  // Rows of the last dim (the bias's width); without a bias the zeros change nothing.
  const int64_t W = h.dim() >= 1 ? h.size(-1) : 1;
  MDD_CHECK(!bias.defined() || bias.numel() == W,
            fmt::format("gelu_tanh_: bias [{}] does not match the last dim of h ({})", bias.numel(), W));
  std::vector<float> zeros;
  Tensor keep;
  const float* b = bias_or_zeros(bias, W, zeros, keep, "gelu_tanh_");
  const int64_t rows = n / W;
  if (is_bf16(h)) {
    uint16_t* p = bf16_ptr_mut(h);
    at::parallel_for(0, rows, grain_rows(W), [&](int64_t r0, int64_t r1) { gelu_bias_range(p, b, W, r0, r1); });
  } else {
    float* p = h.data_ptr<float>();
    at::parallel_for(0, rows, grain_rows(W), [&](int64_t r0, int64_t r1) { gelu_bias_range(p, b, W, r0, r1); });
  }
  return h;
}

namespace {

// attention_from_qkv; with `stats` non-null also keeps each softmax row's max and 1 / sum
// (float [B, heads, N, 2]).
Tensor attention_impl(const Tensor& qkv_in, int64_t heads, const Tensor& gamma, const Tensor& bias, Tensor* stats) {
  MDD_CHECK(qkv_in.defined() && qkv_in.dim() == 3 && qkv_in.device().is_cpu() &&
                (qkv_in.scalar_type() == torch::kFloat32 || is_bf16(qkv_in)),
            "attention_from_qkv: qkv must be a float or bfloat16 CPU tensor [B, N, 3D]");
  const Tensor qkv = qkv_in.contiguous();
  const int64_t B = qkv.size(0), N = qkv.size(1);
  MDD_CHECK(heads > 0 && qkv.size(2) % (3 * heads) == 0,
            fmt::format("attention_from_qkv: last dim {} is not 3 x heads ({}) x head_dim", qkv.size(2), heads));
  const int64_t D = qkv.size(2) / 3, hd = D / heads;
  std::vector<float> ones;
  Tensor keep;
  const float* g = factors_or_ones(gamma, 3 * D, ones, keep, "attention_from_qkv");
  std::vector<float> zeros;
  Tensor keep_b;
  const float* bp = bias_or_zeros(bias, 3 * D, zeros, keep_b, "attention_from_qkv");
  AttnArgs a{g, bp, B, N, heads, hd, static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)))};
  if (stats != nullptr) {
    *stats = torch::empty({B, heads, N, 2}, qkv.options().dtype(torch::kFloat32));
    a.stats = stats->data_ptr<float>();
  }
  Tensor out = torch::empty({B, N, D}, qkv.options());
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, N * N * hd));
#ifdef MDD_BF16_DOT_ATTENTION
  // Head dims up to 128 (every DiT config; the Q block of four rows stays in L1).
  if (stats == nullptr && is_bf16(qkv) && hd % 2 == 0 && hd <= 128 && bf16_dot_attention_available() &&
      g_bf16_dot_attention.load()) {
    const int64_t words = attention_dot_scratch(N, hd);
    at::parallel_for(0, B * heads, std::max<int64_t>(1, grain / 2), [&](int64_t b, int64_t e) {
      // 64-byte aligned (every region's size is a multiple of 16 words): no zmm access splits a
      // cache line.
      std::vector<uint32_t> buf(static_cast<size_t>(words + 16));
      auto* p = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t{63});
      attention_dot_range(a, bf16_ptr(qkv), bf16_ptr_mut(out), p, b, e);
    });
    return out;
  }
#endif
  const int64_t buf_floats = attention_scratch(N, hd);
  at::parallel_for(0, B * heads, grain, [&](int64_t b, int64_t e) {
    std::vector<float> buf(static_cast<size_t>(buf_floats));
    if (is_bf16(qkv)) {
      attention_range(a, bf16_ptr(qkv), bf16_ptr_mut(out), buf.data(), b, e);
    } else {
      attention_range(a, qkv.data_ptr<float>(), out.data_ptr<float>(), buf.data(), b, e);
    }
  });
  return out;
}

}  // namespace

bool bf16_dot_attention_available() { return cpu_has_bf16_dot(); }

bool set_bf16_dot_attention(bool enable) { return g_bf16_dot_attention.exchange(enable); }

Tensor attention_from_qkv(const Tensor& qkv, int64_t heads, const Tensor& gamma, const Tensor& bias) {
  return attention_impl(qkv, heads, gamma, bias, nullptr);
}

Tensor gated_residual(const Tensor& x_in, const Tensor& gate, const Tensor& outer, const Tensor& a_in,
                      const Tensor& inner, const Tensor& bias) {
  constexpr const char* what = "gated_residual";
  MDD_CHECK(x_in.defined() && x_in.dim() == 3 && x_in.scalar_type() == torch::kFloat32 && x_in.device().is_cpu(),
            "gated_residual: x must be a float CPU tensor [B, N, D]");
  MDD_CHECK(a_in.defined() && a_in.sizes() == x_in.sizes() && a_in.device().is_cpu() &&
                (a_in.scalar_type() == torch::kFloat32 || is_bf16(a_in)),
            "gated_residual: a must be a float or bfloat16 CPU tensor shaped like x");
  const Tensor x = x_in.contiguous(), a = a_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  check_rows(gate, B, D, what, "gate");
  std::vector<float> ones_o, ones_i, zeros;
  Tensor keep_o, keep_i, keep_b;
  const ResArgs r{x.data_ptr<float>(),
                  gate.data_ptr<float>(),
                  factors_or_ones(outer, D, ones_o, keep_o, what),
                  factors_or_ones(inner, D, ones_i, keep_i, what),
                  bias_or_zeros(bias, D, zeros, keep_b, what),
                  gate.stride(0),
                  N,
                  D};
  Tensor out = torch::empty_like(x);
  float* o = out.data_ptr<float>();
  if (is_bf16(a)) {
    const uint16_t* ap = bf16_ptr(a);
    at::parallel_for(0, B * N, grain_rows(D), [&](int64_t b, int64_t e) { residual_range(r, ap, o, b, e); });
  } else {
    const float* ap = a.data_ptr<float>();
    at::parallel_for(0, B * N, grain_rows(D), [&](int64_t b, int64_t e) { residual_range(r, ap, o, b, e); });
  }
  return out;
}

Tensor fused_block_forward(DiTBlockImpl& block, const Tensor& x_in, const Tensor& c, FusedDiTMode mode) {
  const bool bf16 = mode == FusedDiTMode::kBF16;
  const auto act = bf16 ? torch::kBFloat16 : torch::kFloat32;
  const Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  // [B, 6D]: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp. Small; under autocast
  // its Linear runs in bf16 as on the module path, and the kernels read it as float.
  const Tensor mod = block.adaLN_modulation->forward(c).to(torch::kFloat32).contiguous();
  MDD_CHECK(mod.dim() == 2 && mod.size(0) == B && mod.size(1) == 6 * D,
            fmt::format("DiTBlock: c must give [{}, {}] modulation rows", B, 6 * D));
  auto part = [&](int64_t k) { return mod.narrow(1, k * D, D); };
  const DiTAttentionImpl& attn = *block.attn;
  // The four products leave their bias out; the kernel reading each product adds it in float32
  // (addmm would first copy the broadcast bias into its output, a pass over every activation).
  Tensor h = ln_modulate(x, part(0), part(1), 1e-6, act);
  Tensor qkv = linear_in(h.view({B * N, D}), attn.qkv, bf16, false).view({B, N, 3 * D});
  Tensor o = attention_from_qkv(qkv, attn.num_heads, attn.gamma1, attn.qkv->bias);
  Tensor a = linear_in(o.view({B * N, D}), attn.proj, bf16, false).view({B, N, D});
  const Tensor x1 = gated_residual(x, part(2), block.gamma1, a, attn.gamma2, attn.proj->bias);
  h = ln_modulate(x1, part(3), part(4), 1e-6, act);
  Tensor m = linear_in(h.view({B * N, D}), block.mlp->fc1, bf16, false);
  gelu_tanh_(m, block.mlp->fc1->bias);
  m = linear_in(m, block.mlp->fc2, bf16, false).view({B, N, D});
  return gated_residual(x1, part(5), block.gamma2, m, Tensor(), block.mlp->fc2->bias);
}

Tensor fused_final_forward(FinalLayerImpl& layer, const Tensor& x_in, const Tensor& c, FusedDiTMode mode) {
  const bool bf16 = mode == FusedDiTMode::kBF16;
  const Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const Tensor mod = layer.adaLN_modulation->forward(c).to(torch::kFloat32).contiguous();  // shift, scale
  MDD_CHECK(mod.dim() == 2 && mod.size(0) == B && mod.size(1) == 2 * D,
            fmt::format("FinalLayer: c must give [{}, {}] modulation rows", B, 2 * D));
  const Tensor h = ln_modulate(x, mod.narrow(1, 0, D), mod.narrow(1, D, D), 1e-6, bf16 ? torch::kBFloat16 : torch::kFloat32);
  return linear_in(h.view({B * N, D}), layer.linear, bf16).view({B, N, -1});
}


// ------------------------------------------------------------------ training (autograd functions)

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Autograd functions cannot take undefined tensors (LibTorch 2.x records each input's metadata),
// so an absent optional factor travels as an empty tensor and is undefined again inside.
Tensor to_input(const Tensor& t) { return t.defined() ? t : torch::empty({0}); }
Tensor from_input(const Tensor& t) { return t.numel() == 0 ? Tensor() : t; }

// The backward kernels are not differentiable: a backward with create_graph (grad mode on inside
// the backward) would silently drop second-order terms, so it is refused. LibTorch 1.13 runs custom
// backward functions with grad mode off even then, so there it cannot be detected (documented).
void refuse_double_backward(const char* what) {
  MDD_CHECK(!torch::GradMode::is_enabled(),
            fmt::format("{}: double backward (create_graph) is not supported by the fused DiT training kernels; "
                        "build the DiT with DiTOptions::fused(false) for it",
                        what));
}

// The gradient in the dtype its kernel reads: float or bfloat16 as the output was.
Tensor grad_as(const Tensor& g, torch::ScalarType dtype) {
  return (g.scalar_type() == dtype ? g : g.to(dtype)).contiguous();
}

class LnModulateFn : public torch::autograd::Function<LnModulateFn> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x_in, const Tensor& shift, const Tensor& scale, double eps,
                        bool bf16_out) {
    const Tensor x = x_in.contiguous();
    Tensor mean, rstd;
    Tensor y = ln_modulate_impl(x, shift, scale, eps, bf16_out ? torch::kBFloat16 : torch::kFloat32, &mean, &rstd);
    ctx->save_for_backward({x, scale, mean, rstd});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("ln_modulate");
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &scale = saved[1], &mean = saved[2], &rstd = saved[3];
    const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
    const Tensor g = grad_as(grads[0], is_bf16(grads[0]) ? torch::kBFloat16 : torch::kFloat32);
    Tensor dx = torch::empty_like(x), dshift = torch::empty({B, D}, x.options()), dscale = torch::empty({B, D}, x.options());
    const LnBackArgs a{x.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(), scale.data_ptr<float>(),
                       scale.stride(0), N, D, dx.data_ptr<float>(), dshift.data_ptr<float>(), dscale.data_ptr<float>()};
    at::parallel_for(0, B, grain_samples(N, D), [&](int64_t b, int64_t e) {
      std::vector<float> buf(static_cast<size_t>(2 * D));
      if (is_bf16(g)) {
        ln_modulate_back_range(a, bf16_ptr(g), buf.data(), b, e);
      } else {
        ln_modulate_back_range(a, g.data_ptr<float>(), buf.data(), b, e);
      }
    });
    return {dx, dshift, dscale, Tensor(), Tensor()};
  }
};

class GatedResidualFn : public torch::autograd::Function<GatedResidualFn> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& gate, const Tensor& outer_in,
                        const Tensor& a_in, const Tensor& inner_in) {
    const Tensor a = a_in.contiguous(), outer = from_input(outer_in), inner = from_input(inner_in);
    Tensor out = gated_residual(x, gate, outer, a, inner);
    ctx->save_for_backward({gate, outer_in, a, inner_in});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("gated_residual");
    const auto saved = ctx->get_saved_variables();
    const Tensor &gate = saved[0], outer = from_input(saved[1]), &a = saved[2], inner = from_input(saved[3]);
    const int64_t B = a.size(0), N = a.size(1), D = a.size(2);
    const Tensor g = grad_as(grads[0], torch::kFloat32);
    std::vector<float> ones_o, ones_i;
    Tensor keep_o, keep_i;
    Tensor t = torch::empty({B, D}, g.options());
    const ResBackArgs r{gate.data_ptr<float>(), factors_or_ones(outer, D, ones_o, keep_o, "gated_residual"),
                        factors_or_ones(inner, D, ones_i, keep_i, "gated_residual"), gate.stride(0), N, D,
                        t.data_ptr<float>()};
    Tensor da = torch::empty_like(a);
    const int64_t grain = grain_samples(N, D);
    if (is_bf16(a)) {
      at::parallel_for(0, B, grain, [&](int64_t b, int64_t e) {
        residual_back_range(r, g.data_ptr<float>(), bf16_ptr(a), bf16_ptr_mut(da), b, e);
      });
    } else {
      at::parallel_for(0, B, grain, [&](int64_t b, int64_t e) {
        residual_back_range(r, g.data_ptr<float>(), a.data_ptr<float>(), da.data_ptr<float>(), b, e);
      });
    }
    // d out / d gate = outer * inner * a; d / d outer = gate * inner * a; d / d inner = outer * gate * a.
    Tensor dgate = t, douter, dinner;
    if (outer.defined()) dgate = dgate * outer;
    if (inner.defined()) dgate = dgate * inner;
    if (outer.defined()) douter = (inner.defined() ? t * gate * inner : t * gate).sum(0);
    if (inner.defined()) dinner = (outer.defined() ? t * outer * gate : t * gate).sum(0);
    return {g, dgate, douter, da, dinner};
  }
};

class GeluTanhFn : public torch::autograd::Function<GeluTanhFn> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& h_in) {
    const Tensor h = h_in.contiguous();
    MDD_CHECK(h.device().is_cpu() && (h.scalar_type() == torch::kFloat32 || is_bf16(h)),
              "gelu_tanh: h must be a float or bfloat16 CPU tensor");
    Tensor y = torch::empty_like(h);
    const int64_t n = h.numel();
    if (is_bf16(h)) {
      at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) { gelu_out_range(bf16_ptr(h), bf16_ptr_mut(y), b, e); });
    } else {
      at::parallel_for(0, n, 16384,
                       [&](int64_t b, int64_t e) { gelu_out_range(h.data_ptr<float>(), y.data_ptr<float>(), b, e); });
    }
    ctx->save_for_backward({h});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("gelu_tanh");
    const Tensor h = ctx->get_saved_variables()[0];
    const Tensor g = grad_as(grads[0], h.scalar_type());
    Tensor dh = torch::empty_like(h);
    const int64_t n = h.numel();
    if (is_bf16(h)) {
      at::parallel_for(0, n, 16384,
                       [&](int64_t b, int64_t e) { gelu_back_range(bf16_ptr(h), bf16_ptr(g), bf16_ptr_mut(dh), b, e); });
    } else {
      at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) {
        gelu_back_range(h.data_ptr<float>(), g.data_ptr<float>(), dh.data_ptr<float>(), b, e);
      });
    }
    return {dh};
  }
};

class AttentionFn : public torch::autograd::Function<AttentionFn> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& qkv_in, const Tensor& gamma_in, int64_t heads) {
    const Tensor qkv = qkv_in.contiguous(), gamma = from_input(gamma_in);
    Tensor stats;
    Tensor out = attention_impl(qkv, heads, gamma, Tensor(), &stats);
    ctx->save_for_backward({qkv, gamma_in, stats});
    ctx->saved_data["heads"] = heads;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("attention");
    const auto saved = ctx->get_saved_variables();
    const Tensor &qkv = saved[0], gamma = from_input(saved[1]), &stats = saved[2];
    const int64_t heads = ctx->saved_data["heads"].toInt();
    const int64_t B = qkv.size(0), N = qkv.size(1), D = qkv.size(2) / 3, hd = D / heads;
    const Tensor g = grad_as(grads[0], qkv.scalar_type());
    std::vector<float> ones;
    Tensor keep;
    Tensor dgamma = torch::zeros({B, 3 * D}, qkv.options().dtype(torch::kFloat32));
    const AttnBackArgs a{factors_or_ones(gamma, 3 * D, ones, keep, "attention_from_qkv"), stats.data_ptr<float>(), B, N,
                         heads, hd, static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd))),
                         dgamma.data_ptr<float>()};
    Tensor dqkv = torch::empty_like(qkv);
    const int64_t buf_floats = attention_back_scratch(N, hd);
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, 3 * N * N * hd));
    at::parallel_for(0, B * heads, grain, [&](int64_t b, int64_t e) {
      std::vector<float> buf(static_cast<size_t>(buf_floats));
      if (is_bf16(qkv)) {
        attention_back_range(a, bf16_ptr(qkv), bf16_ptr(g), bf16_ptr_mut(dqkv), buf.data(), b, e);
      } else {
        attention_back_range(a, qkv.data_ptr<float>(), g.data_ptr<float>(), dqkv.data_ptr<float>(), buf.data(), b, e);
      }
    });
    return {dqkv, gamma.defined() ? dgamma.sum(0) : Tensor(), Tensor()};
  }
};

}  // namespace

FusedDiTMode fused_dit_train_mode(const Tensor& x, const Tensor& w) {
  return torch::GradMode::is_enabled() ? cpu_float_mode(x, w) : FusedDiTMode::kNone;
}

Tensor ln_modulate_train(const Tensor& x, const Tensor& shift, const Tensor& scale, double eps, bool bf16_out) {
  return LnModulateFn::apply(x, shift, scale, eps, bf16_out);
}

Tensor gated_residual_train(const Tensor& x, const Tensor& gate, const Tensor& outer, const Tensor& a,
                            const Tensor& inner) {
  return GatedResidualFn::apply(x, gate, to_input(outer), a, to_input(inner));
}

Tensor gelu_tanh_train(const Tensor& h) { return GeluTanhFn::apply(h); }

Tensor attention_train(const Tensor& qkv, int64_t heads, const Tensor& gamma) {
  return AttentionFn::apply(qkv, to_input(gamma), heads);
}

namespace {
// Whether training takes the fused attention or the module's. The fused kernels compute in float32
// (short rows, per (sample, head) tasks), the module path's bf16 attention runs its products as
// bf16 GEMMs, which win once the sequence is long: DiT-S/2 (256 tokens) forward + backward measured
// 752/697 ms (module attention) against 788/771 ms (fused) under bf16 autocast, 2690/2199 against
// 2243/2191 ms in float32, while at the demo's 49 tokens the fused attention made the whole step
// 1.2-1.4x faster (session 23, bench_models DiTTraining, 2 rounds).
bool fused_attention_for_training(int64_t tokens, bool bf16) { return tokens <= (bf16 ? 128 : 256); }
}  // namespace

Tensor fused_block_forward_train(DiTBlockImpl& block, const Tensor& x_in, const Tensor& c, FusedDiTMode mode) {
  const bool bf16 = mode == FusedDiTMode::kBF16;
  const Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const Tensor mod = block.adaLN_modulation->forward(c).to(torch::kFloat32);
  MDD_CHECK(mod.dim() == 2 && mod.size(0) == B && mod.size(1) == 6 * D,
            fmt::format("DiTBlock: c must give [{}, {}] modulation rows", B, 6 * D));
  auto part = [&](int64_t k) { return mod.narrow(1, k * D, D); };
  DiTAttentionImpl& attn = *block.attn;
  // The products are the modules' own Linear calls (under bf16 autocast: bf16 weights from
  // autocast's cache, bf16 in and out; the kernels in between write bf16 directly).
  Tensor h = ln_modulate_train(x, part(0), part(1), 1e-6, bf16);
  Tensor x1;
  if (fused_attention_for_training(N, bf16)) {
    Tensor qkv = attn.qkv->forward(h.view({B * N, D})).view({B, N, 3 * D});
    Tensor o = attention_train(qkv, attn.num_heads, attn.gamma1);
    Tensor a = attn.proj->forward(o.view({B * N, D})).view({B, N, D});
    x1 = gated_residual_train(x, part(2), block.gamma1, a, attn.gamma2);
  } else {
    // The module's attention (qkv, gamma1, attention, proj and gamma2 included).
    x1 = gated_residual_train(x, part(2), block.gamma1, attn.forward(h), Tensor());
  }
  h = ln_modulate_train(x1, part(3), part(4), 1e-6, bf16);
  Tensor m = gelu_tanh_train(block.mlp->fc1->forward(h.view({B * N, D})));
  m = block.mlp->fc2->forward(m).view({B, N, D});
  return gated_residual_train(x1, part(5), block.gamma2, m, Tensor());
}

Tensor fused_final_forward_train(FinalLayerImpl& layer, const Tensor& x_in, const Tensor& c, FusedDiTMode mode) {
  const Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  const Tensor mod = layer.adaLN_modulation->forward(c).to(torch::kFloat32);
  MDD_CHECK(mod.dim() == 2 && mod.size(0) == B && mod.size(1) == 2 * D,
            fmt::format("FinalLayer: c must give [{}, {}] modulation rows", B, 2 * D));
  const Tensor h = ln_modulate_train(x, mod.narrow(1, 0, D), mod.narrow(1, D, D), 1e-6, mode == FusedDiTMode::kBF16);
  return layer.linear->forward(h.view({B * N, D})).view({B, N, -1});
}

}  // namespace mdd::detail
