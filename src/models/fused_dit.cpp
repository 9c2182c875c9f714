#include "models/fused_dit.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
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

// ------------------------------------------------------------------ LayerNorm + modulate

struct LnArgs {
  const float* x;
  const float* shift;
  const float* scale;
  int64_t mod_stride, tokens, width;
  float eps;
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
template <typename T>
MDD_INLINE void gelu_elems(T* h, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const float x = load(h, i);
    const float u = 0.7978845608028654F * (x + 0.044715F * x * x * x);
    store(h, i, x / (1.0F + exp_approx(-2.0F * u)));
  }
}

MDD_CPU_CLONES_AVX512 void gelu_range(float* h, int64_t begin, int64_t end) { gelu_elems(h, begin, end); }
MDD_CPU_CLONES_AVX512 void gelu_range(uint16_t* h, int64_t begin, int64_t end) { gelu_elems(h, begin, end); }

// ------------------------------------------------------------------ attention

struct AttnArgs {
  const float* gamma;  // [3D]: ones when the model has no DiffFit gammas
  int64_t batch, tokens, heads, head_dim;
  float scale;
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

// Floats of scratch one task needs (see attention_tasks).
int64_t attention_scratch(int64_t N, int64_t hd) {
  return N * hd + round_up(N, kCols) * hd + N * round_up(hd, kCols) + kRows * round_up(N, kCols);
}

// One (sample, head) per task. q (scaled), k^T and v are gathered into float buffers, zero-padded
// to whole kCols blocks so that the inner loops have a fixed width the compiler turns into whole
// vectors. Scores are built kRows query rows x kCols keys at a time with the accumulators in
// registers, soft-maxed per row, and the output accumulated kRows rows x kCols head dims at a time.
template <typename In, typename Out>
MDD_INLINE void attention_tasks(const AttnArgs& a, const In* qkv, Out* out, float* buf, int64_t begin, int64_t end) {
  const int64_t N = a.tokens, hd = a.head_dim, D = a.heads * hd, row = 3 * D;
  const int64_t Np = round_up(N, kCols), hdp = round_up(hd, kCols);
  float* Q = buf;           // [N, hd]
  float* Kt = Q + N * hd;   // [hd, Np], zero columns past N
  float* V = Kt + hd * Np;  // [N, hdp], zero columns past hd
  float* S = V + N * hdp;   // [kRows, Np]
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / a.heads, h = task % a.heads;
    const In* base = qkv + b * N * row;
    const int64_t cq = h * hd, ck = D + h * hd, cv = 2 * D + h * hd;
    const float* gq = a.gamma + cq;
    const float* gk = a.gamma + ck;
    const float* gv = a.gamma + cv;
    for (int64_t d = 0; d < hd; ++d)
      for (int64_t n = N; n < Np; ++n) Kt[d * Np + n] = 0.0F;
    // Three loops, not one: q and v rows are contiguous copies that vectorise; only k^T is a
    // transposing (scalar) store.
    for (int64_t n = 0; n < N; ++n) {
      const In* r = base + n * row;
      float* qn = Q + n * hd;
      for (int64_t d = 0; d < hd; ++d) qn[d] = (gq[d] * load(r, cq + d)) * a.scale;
      float* vn = V + n * hdp;
      for (int64_t d = 0; d < hd; ++d) vn[d] = gv[d] * load(r, cv + d);
      for (int64_t d = hd; d < hdp; ++d) vn[d] = 0.0F;
    }
    for (int64_t n = 0; n < N; ++n) {
      const In* r = base + n * row + ck;
      for (int64_t d = 0; d < hd; ++d) Kt[d * Np + n] = gk[d] * load(r, d);
    }
    for (int64_t i0 = 0; i0 < N; i0 += kRows) {
      const int64_t rows = std::min(kRows, N - i0);
      // Rows past N repeat the last query; their results are never stored.
      const float* q0 = Q + std::min(i0 + 0, N - 1) * hd;
      const float* q1 = Q + std::min(i0 + 1, N - 1) * hd;
      const float* q2 = Q + std::min(i0 + 2, N - 1) * hd;
      const float* q3 = Q + std::min(i0 + 3, N - 1) * hd;
      for (int64_t j0 = 0; j0 < Np; j0 += kCols) {
        VecF a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
        for (int64_t d = 0; d < hd; ++d) {
          const VecF k = vload(Kt + d * Np + j0);
          vfma(a0, q0[d], k);
          vfma(a1, q1[d], k);
          vfma(a2, q2[d], k);
          vfma(a3, q3[d], k);
        }
        vstore(S + 0 * Np + j0, a0);
        vstore(S + 1 * Np + j0, a1);
        vstore(S + 2 * Np + j0, a2);
        vstore(S + 3 * Np + j0, a3);
      }
      float inv[kRows];
      for (int64_t r = 0; r < kRows; ++r) {
        float* s = S + r * Np;
        const float m = lane_max(s, N);
        for (int64_t j = 0; j < N; ++j) s[j] = exp_approx(s[j] - m);
        inv[r] = 1.0F / lane_sum(s, N);
      }
      for (int64_t d0 = 0; d0 < hdp; d0 += kCols) {
        VecF a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
        for (int64_t j = 0; j < N; ++j) {
          const VecF v = vload(V + j * hdp + d0);
          vfma(a0, S[0 * Np + j], v);
          vfma(a1, S[1 * Np + j], v);
          vfma(a2, S[2 * Np + j], v);
          vfma(a3, S[3 * Np + j], v);
        }
        float o[kRows][kCols];
        vstore(o[0], a0);
        vstore(o[1], a1);
        vstore(o[2], a2);
        vstore(o[3], a3);
        const int64_t w = std::min(kCols, hd - d0);
        for (int64_t r = 0; r < rows; ++r) {
          Out* dst = out + (b * N + i0 + r) * D + h * hd + d0;
          for (int64_t c = 0; c < w; ++c) store(dst, c, o[r][c] * inv[r]);
        }
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

// ------------------------------------------------------------------ gated residual

struct ResArgs {
  const float* x;
  const float* gate;
  const float* outer;  // [D]: ones when absent
  const float* inner;  // [D]: ones when absent
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
    // The module path's op order: x + (gamma1 * gate) * (gamma2 * a).
    for (int64_t d = 0; d < D; ++d) o[d] = x[d] + (r.outer[d] * g[d]) * (r.inner[d] * load(ar, d));
  }
}

MDD_CPU_CLONES_AVX512 void residual_range(const ResArgs& r, const float* a, float* out, int64_t begin, int64_t end) {
  residual_rows(r, a, out, begin, end);
}
MDD_CPU_CLONES_AVX512 void residual_range(const ResArgs& r, const uint16_t* a, float* out, int64_t begin,
                                          int64_t end) {
  residual_rows(r, a, out, begin, end);
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

// Per-channel factors as a float pointer: the tensor's data, or ones when it is undefined.
const float* factors_or_ones(const Tensor& t, int64_t n, std::vector<float>& ones, Tensor& keep, const char* what) {
  if (!t.defined()) {
    ones.assign(static_cast<size_t>(n), 1.0F);
    return ones.data();
  }
  MDD_CHECK(t.scalar_type() == torch::kFloat32 && t.numel() == n, fmt::format("{}: factors must be float [{}]", what, n));
  keep = t.contiguous();
  return keep.data_ptr<float>();
}

// Linear(in2d) in the mode's precision: bf16 weights and activations (bf16 out) or float32. The
// weights go through autocast's own cast cache, as the module path's Linear does, so a caller that
// keeps one autocast region open over many forwards casts each weight once.
Tensor linear_in(const Tensor& in2d, const torch::nn::Linear& l, bool bf16) {
  Tensor w = l->weight, b = l->bias;
  if (bf16) {
    w = at::autocast::cached_cast(torch::kBFloat16, w, c10::DeviceType::CPU);
    if (b.defined()) b = at::autocast::cached_cast(torch::kBFloat16, b, c10::DeviceType::CPU);
  }
  return b.defined() ? at::addmm(b, in2d, w.t()) : at::mm(in2d, w.t());
}

}  // namespace

FusedDiTMode fused_dit_mode(const Tensor& x, const Tensor& w) {
  if (torch::GradMode::is_enabled()) return FusedDiTMode::kNone;
  if (!x.defined() || !w.defined() || x.dim() != 3 || !x.device().is_cpu() || !w.device().is_cpu())
    return FusedDiTMode::kNone;
  if (x.scalar_type() != torch::kFloat32 || w.scalar_type() != torch::kFloat32) return FusedDiTMode::kNone;
  if (!compat::autocast_enabled(c10::DeviceType::CPU)) return FusedDiTMode::kFP32;
  return compat::autocast_dtype(c10::DeviceType::CPU) == torch::kBFloat16 ? FusedDiTMode::kBF16 : FusedDiTMode::kNone;
}

Tensor ln_modulate(const Tensor& x_in, const Tensor& shift, const Tensor& scale, double eps, torch::ScalarType out_dtype) {
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
  const LnArgs a{x.data_ptr<float>(), shift.data_ptr<float>(), scale.data_ptr<float>(), shift.stride(0), N, D,
                 static_cast<float>(eps)};
  if (out_dtype == torch::kBFloat16) {
    uint16_t* o = bf16_ptr_mut(out);
    at::parallel_for(0, B * N, grain_rows(D), [&](int64_t b, int64_t e) { ln_modulate_range(a, o, b, e); });
  } else {
    float* o = out.data_ptr<float>();
    at::parallel_for(0, B * N, grain_rows(D), [&](int64_t b, int64_t e) { ln_modulate_range(a, o, b, e); });
  }
  return out;
}

Tensor gelu_tanh_(Tensor h) {
  check_cpu_contiguous(h, "gelu_tanh_", "h");
  const int64_t n = h.numel();
  if (is_bf16(h)) {
    uint16_t* p = bf16_ptr_mut(h);
    at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) { gelu_range(p, b, e); });
  } else {
    MDD_CHECK(h.scalar_type() == torch::kFloat32, "gelu_tanh_: h must be float or bfloat16");
    float* p = h.data_ptr<float>();
    at::parallel_for(0, n, 16384, [&](int64_t b, int64_t e) { gelu_range(p, b, e); });
  }
  return h;
}

Tensor attention_from_qkv(const Tensor& qkv_in, int64_t heads, const Tensor& gamma) {
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
  const AttnArgs a{g, B, N, heads, hd, static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)))};
  Tensor out = torch::empty({B, N, D}, qkv.options());
  const int64_t buf_floats = attention_scratch(N, hd);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, N * N * hd));
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

Tensor gated_residual(const Tensor& x_in, const Tensor& gate, const Tensor& outer, const Tensor& a_in,
                      const Tensor& inner) {
  constexpr const char* what = "gated_residual";
  MDD_CHECK(x_in.defined() && x_in.dim() == 3 && x_in.scalar_type() == torch::kFloat32 && x_in.device().is_cpu(),
            "gated_residual: x must be a float CPU tensor [B, N, D]");
  MDD_CHECK(a_in.defined() && a_in.sizes() == x_in.sizes() && a_in.device().is_cpu() &&
                (a_in.scalar_type() == torch::kFloat32 || is_bf16(a_in)),
            "gated_residual: a must be a float or bfloat16 CPU tensor shaped like x");
  const Tensor x = x_in.contiguous(), a = a_in.contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  check_rows(gate, B, D, what, "gate");
  std::vector<float> ones_o, ones_i;
  Tensor keep_o, keep_i;
  const ResArgs r{x.data_ptr<float>(), gate.data_ptr<float>(), factors_or_ones(outer, D, ones_o, keep_o, what),
                  factors_or_ones(inner, D, ones_i, keep_i, what), gate.stride(0), N, D};
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
  Tensor h = ln_modulate(x, part(0), part(1), 1e-6, act);
  Tensor qkv = linear_in(h.view({B * N, D}), attn.qkv, bf16).view({B, N, 3 * D});
  Tensor o = attention_from_qkv(qkv, attn.num_heads, attn.gamma1);
  Tensor a = linear_in(o.view({B * N, D}), attn.proj, bf16).view({B, N, D});
  const Tensor x1 = gated_residual(x, part(2), block.gamma1, a, attn.gamma2);
  h = ln_modulate(x1, part(3), part(4), 1e-6, act);
  Tensor m = linear_in(h.view({B * N, D}), block.mlp->fc1, bf16);
  gelu_tanh_(m);
  m = linear_in(m, block.mlp->fc2, bf16).view({B, N, D});
  return gated_residual(x1, part(5), block.gamma2, m, Tensor());
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

}  // namespace mdd::detail
