#include "models/fused_convnet.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include "mdd/util/error.h"
#include "util/cpu_kernels.h"

namespace mdd::detail {
namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/// sum over `rows` rows of dot(p row, q row), `cols` wide, rows `ps` / `qs` floats apart.
MDD_INLINE float lane_dot_rows(const float* p, int64_t ps, const float* q, int64_t qs, int64_t rows, int64_t cols) {
  float acc[kLanes] = {};
  float s = 0;
  for (int64_t r = 0; r < rows; ++r, p += ps, q += qs) {
    int64_t i = 0;
    for (; i + kLanes <= cols; i += kLanes) {
      for (int k = 0; k < kLanes; ++k) acc[k] += p[i + k] * q[i + k];
    }
    for (; i < cols; ++i) s += p[i] * q[i];
  }
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s;
}

/// Geometry of one block: input plane H x W, pooled plane Ho x Wo (floor).
struct Geom {
  int64_t H, W, Ho, Wo;
  int64_t plane() const { return H * W; }
  int64_t pooled() const { return Ho * Wo; }
};

/// Per-plane statistics and the folded affine y = a * x + b (as PyTorch's GroupNorm applies it).
struct Affine {
  float mean = 0, rstd = 1, a = 1, b = 0;
};

MDD_INLINE Affine plane_affine(const float* x, const Geom& g, float gamma, float beta, float eps, bool normalize) {
  Affine f;
  if (!normalize) return f;
  const auto m = static_cast<float>(g.plane());
  f.mean = lane_sum(x, g.plane()) / m;
  const float var = lane_sq_dev(x, g.plane(), f.mean) / m;
  f.rstd = 1.0F / std::sqrt(var + eps);
  f.a = f.rstd * gamma;
  f.b = -f.a * f.mean + beta;
  return f;
}

/// out[i, j] = mean of relu(a * x + b) over the 2x2 window; `z` holds 2 * Wo floats.
MDD_INLINE void plane_forward(const float* x, const Geom& g, const Affine& f, float* out, float* z) {
  const int64_t w2 = 2 * g.Wo;
  for (int64_t i = 0; i < g.Ho; ++i) {
    const float* r0 = x + (2 * i) * g.W;
    const float* r1 = r0 + g.W;
    for (int64_t j = 0; j < w2; ++j) {
      z[j] = std::max(f.a * r0[j] + f.b, 0.0F) + std::max(f.a * r1[j] + f.b, 0.0F);
    }
    float* o = out + i * g.Wo;
    for (int64_t j = 0; j < g.Wo; ++j) o[j] = (z[2 * j] + z[2 * j + 1]) * 0.25F;
  }
}

/// Backward of one plane: writes d loss / d x into dx and returns {sum dy, sum dy * xhat} (the
/// beta and gamma gradients of this plane). `up` holds W floats.
MDD_INLINE std::pair<float, float> plane_backward(const float* x, const Geom& g, const Affine& f, float gamma,
                                                  bool normalize, const float* dout, float* dx, float* up) {
  float acc_a[kLanes] = {}, acc_b[kLanes] = {};
  float sa = 0, sb = 0;
  for (int64_t i = 0; i < g.H; ++i) {
    const float* xr = x + i * g.W;
    float* dr = dx + i * g.W;
    if (i >= 2 * g.Ho) {  // floor pooling: rows past the last window get no gradient from the pool
      std::fill(dr, dr + g.W, 0.0F);
      continue;
    }
    if (i % 2 == 0) {
      const float* orow = dout + (i / 2) * g.Wo;
      for (int64_t j = 0; j < g.Wo; ++j) up[2 * j] = up[2 * j + 1] = orow[j] * 0.25F;
      for (int64_t j = 2 * g.Wo; j < g.W; ++j) up[j] = 0.0F;
    }
    int64_t j = 0;
    for (; j + kLanes <= g.W; j += kLanes) {
      for (int k = 0; k < kLanes; ++k) {
        // Both operands loaded unconditionally so the select compiles to a blend, not a branch
        // (the ReLU mask of real activations is a coin flip the predictor cannot learn).
        const float xv = xr[j + k], u = up[j + k];
        const float dy = (f.a * xv + f.b) > 0.0F ? u : 0.0F;
        dr[j + k] = dy;
        acc_a[k] += dy;
        acc_b[k] += dy * ((xv - f.mean) * f.rstd);
      }
    }
    for (; j < g.W; ++j) {
      const float xv = xr[j], u = up[j];
      const float dy = (f.a * xv + f.b) > 0.0F ? u : 0.0F;
      dr[j] = dy;
      sa += dy;
      sb += dy * ((xv - f.mean) * f.rstd);
    }
  }
  for (int k = 0; k < kLanes; ++k) {
    sa += acc_a[k];
    sb += acc_b[k];
  }
  if (normalize) {
    // d x = rstd * gamma * (dy - mean(dy) - xhat * mean(dy * xhat))
    const auto m = static_cast<float>(g.plane());
    const float c = f.rstd * gamma, ka = sa / m, kb = sb / m;
    const int64_t n = g.plane();
    for (int64_t p = 0; p < n; ++p) dx[p] = c * (dx[p] - ka - ((x[p] - f.mean) * f.rstd) * kb);
  }
  return {sa, sb};
}

/// 3x3 stride-1 convolution of one output channel over a zero-padded input [cin, Hp, Wp] into
/// `out` [Hp - 2, Wp - 2].
MDD_INLINE void plane_conv(const float* xpad, int64_t cin, int64_t Hp, int64_t Wp, const float* w, float bias,
                           float* out) {
  const int64_t hc = Hp - 2, wc = Wp - 2;
  for (int64_t i = 0; i < hc; ++i) {
    float* o = out + i * wc;
    for (int64_t j = 0; j < wc; ++j) o[j] = 0.0F;
    for (int64_t ci = 0; ci < cin; ++ci) {
      for (int64_t ky = 0; ky < 3; ++ky) {
        const float* src = xpad + (ci * Hp + i + ky) * Wp;
        const float* wk = w + (ci * 3 + ky) * 3;
        const float w0 = wk[0], w1 = wk[1], w2 = wk[2];
        for (int64_t j = 0; j < wc; ++j) o[j] += w0 * src[j] + w1 * src[j + 1] + w2 * src[j + 2];
      }
    }
    for (int64_t j = 0; j < wc; ++j) o[j] += bias;
  }
}

// ------------------------------------------------------------------------- range kernels

struct NrpArgs {
  const float* x;
  const float* gamma;  // null when !normalize
  const float* beta;
  int64_t C;
  Geom g;
  float eps;
  bool normalize;

  float gamma_at(int64_t c) const { return normalize ? gamma[c] : 1.0F; }
  float beta_at(int64_t c) const { return normalize ? beta[c] : 0.0F; }
  /// The folded affine of plane p (channel c) from its saved statistics.
  Affine saved_affine(const float* mean, const float* rstd, int64_t p, int64_t c) const {
    Affine f;
    f.mean = mean[p];
    f.rstd = rstd[p];
    if (normalize) {
      f.a = f.rstd * gamma[c];
      f.b = -f.a * f.mean + beta[c];
    }
    return f;
  }
};

MDD_CPU_CLONES void nrp_forward_range(const NrpArgs& a, float* out, float* mean, float* rstd, int64_t begin,
                                      int64_t end) {
  std::vector<float> z(static_cast<size_t>(2 * a.g.Wo + kLanes));
  for (int64_t p = begin; p < end; ++p) {
    const int64_t c = p % a.C;
    const float* x = a.x + p * a.g.plane();
    const Affine f = plane_affine(x, a.g, a.gamma_at(c), a.beta_at(c), a.eps, a.normalize);
    plane_forward(x, a.g, f, out + p * a.g.pooled(), z.data());
    mean[p] = f.mean;
    rstd[p] = f.rstd;
  }
}

MDD_CPU_CLONES void nrp_backward_range(const NrpArgs& a, const float* mean, const float* rstd, const float* dout,
                                       float* dx, float* partial, int64_t begin, int64_t end) {
  std::vector<float> up(static_cast<size_t>(a.g.W + kLanes));
  for (int64_t p = begin; p < end; ++p) {
    const int64_t c = p % a.C;
    const Affine f = a.saved_affine(mean, rstd, p, c);
    const auto [sa, sb] = plane_backward(a.x + p * a.g.plane(), a.g, f, a.gamma_at(c), a.normalize,
                                         dout + p * a.g.pooled(), dx + p * a.g.plane(), up.data());
    partial[2 * p] = sb;      // gamma
    partial[2 * p + 1] = sa;  // beta
  }
}

struct ConvArgs {
  const float* xpad;  // [N, cin, Hp, Wp]
  const float* w;     // [C, cin, 3, 3]
  const float* bias;  // [C]
  int64_t cin, Hp, Wp;
};

MDD_CPU_CLONES void cnrp_forward_range(const NrpArgs& a, const ConvArgs& cv, float* out, float* mean, float* rstd,
                                       int64_t begin, int64_t end) {
  std::vector<float> buf(static_cast<size_t>(a.g.plane() + kLanes));
  std::vector<float> z(static_cast<size_t>(2 * a.g.Wo + kLanes));
  for (int64_t p = begin; p < end; ++p) {
    const int64_t n = p / a.C, c = p % a.C;
    plane_conv(cv.xpad + n * cv.cin * cv.Hp * cv.Wp, cv.cin, cv.Hp, cv.Wp, cv.w + c * cv.cin * 9, cv.bias[c],
               buf.data());
    const Affine f = plane_affine(buf.data(), a.g, a.gamma_at(c), a.beta_at(c), a.eps, a.normalize);
    plane_forward(buf.data(), a.g, f, out + p * a.g.pooled(), z.data());
    mean[p] = f.mean;
    rstd[p] = f.rstd;
  }
}

/// partial: [N * C, cin * 9 + 3] = weight grads, bias grad, gamma grad, beta grad of each plane.
MDD_CPU_CLONES void cnrp_backward_range(const NrpArgs& a, const ConvArgs& cv, const float* mean, const float* rstd,
                                        const float* dout, float* partial, int64_t begin, int64_t end) {
  const int64_t k = cv.cin * 9;
  std::vector<float> buf(static_cast<size_t>(a.g.plane() + kLanes));
  std::vector<float> dbuf(static_cast<size_t>(a.g.plane() + kLanes));
  std::vector<float> up(static_cast<size_t>(a.g.W + kLanes));
  const int64_t hc = cv.Hp - 2, wc = cv.Wp - 2;
  for (int64_t p = begin; p < end; ++p) {
    const int64_t n = p / a.C, c = p % a.C;
    const float* xn = cv.xpad + n * cv.cin * cv.Hp * cv.Wp;
    plane_conv(xn, cv.cin, cv.Hp, cv.Wp, cv.w + c * k, cv.bias[c], buf.data());
    const Affine f = a.saved_affine(mean, rstd, p, c);
    const auto [sa, sb] = plane_backward(buf.data(), a.g, f, a.gamma_at(c), a.normalize, dout + p * a.g.pooled(),
                                         dbuf.data(), up.data());
    float* part = partial + p * (k + 3);
    // d weight[ci, ky, kx] = sum_ij dconv[i, j] * xpad[ci, i + ky, j + kx]
    for (int64_t ci = 0; ci < cv.cin; ++ci) {
      for (int64_t ky = 0; ky < 3; ++ky) {
        for (int64_t kx = 0; kx < 3; ++kx) {
          part[(ci * 3 + ky) * 3 + kx] =
              lane_dot_rows(dbuf.data(), wc, xn + (ci * cv.Hp + ky) * cv.Wp + kx, cv.Wp, hc, wc);
        }
      }
    }
    part[k] = lane_sum(dbuf.data(), a.g.plane());
    part[k + 1] = sb;
    part[k + 2] = sa;
  }
}

// ------------------------------------------------------------------------- autograd functions

Geom pooled_geom(int64_t h, int64_t w) { return Geom{h, w, h / 2, w / 2}; }

/// A 3x3 conv over the padded input yields (Hp - 2) x (Wp - 2) planes.
Geom conv_geom(const Tensor& xpad) { return pooled_geom(xpad.size(2) - 2, xpad.size(3) - 2); }

int64_t grain_for(const Geom& g) {
  // Enough planes per task that scheduling is negligible next to a plane's work.
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, g.plane()));
}

/// `x` is null for the conv kernels, whose planes come from the convolution.
NrpArgs make_args(const float* x, int64_t channels, const Geom& g, const Tensor& gamma, const Tensor& beta, double eps,
                  bool normalize) {
  return NrpArgs{x, normalize ? gamma.data_ptr<float>() : nullptr, normalize ? beta.data_ptr<float>() : nullptr,
                 channels, g, static_cast<float>(eps), normalize};
}

ConvArgs make_conv_args(const Tensor& xpad, const Tensor& weight, const Tensor& bias) {
  return ConvArgs{xpad.data_ptr<float>(), weight.data_ptr<float>(), bias.data_ptr<float>(), xpad.size(1),
                  xpad.size(2), xpad.size(3)};
}

Tensor affine_param(const Tensor& t, bool normalize) {
  return normalize ? t.contiguous() : torch::empty({0});
}

class NormReluPoolFn : public torch::autograd::Function<NormReluPoolFn> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x_in, const Tensor& gamma_in, const Tensor& beta_in,
                        double eps, bool normalize) {
    const auto x = x_in.contiguous();
    const auto gamma = affine_param(gamma_in, normalize), beta = affine_param(beta_in, normalize);
    const auto a = make_args(x.data_ptr<float>(), x.size(1), pooled_geom(x.size(2), x.size(3)), gamma, beta, eps,
                             normalize);
    const int64_t planes = x.size(0) * x.size(1);
    auto out = torch::empty({x.size(0), x.size(1), a.g.Ho, a.g.Wo}, x.options());
    auto mean = torch::empty({planes}, x.options()), rstd = torch::empty({planes}, x.options());
    float *o = out.data_ptr<float>(), *m = mean.data_ptr<float>(), *r = rstd.data_ptr<float>();
    at::parallel_for(0, planes, grain_for(a.g), [&](int64_t b, int64_t e) { nrp_forward_range(a, o, m, r, b, e); });
    ctx->save_for_backward({x, gamma, beta, mean, rstd});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["normalize"] = normalize;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &gamma = saved[1], &beta = saved[2], &mean = saved[3], &rstd = saved[4];
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool normalize = ctx->saved_data["normalize"].toBool();
    const auto dout = grads[0].contiguous();
    const auto a = make_args(x.data_ptr<float>(), x.size(1), pooled_geom(x.size(2), x.size(3)), gamma, beta, eps,
                             normalize);
    const int64_t planes = x.size(0) * x.size(1);
    auto dx = torch::empty_like(x);
    auto partial = torch::empty({planes, 2}, x.options());
    const float *m = mean.data_ptr<float>(), *r = rstd.data_ptr<float>(), *go = dout.data_ptr<float>();
    float *gx = dx.data_ptr<float>(), *pp = partial.data_ptr<float>();
    at::parallel_for(0, planes, grain_for(a.g),
                     [&](int64_t b, int64_t e) { nrp_backward_range(a, m, r, go, gx, pp, b, e); });
    Tensor dgamma, dbeta;
    if (normalize) {
      auto per = partial.view({x.size(0), x.size(1), 2}).sum(0);
      dgamma = per.select(1, 0).contiguous();
      dbeta = per.select(1, 1).contiguous();
    }
    return {dx, dgamma, dbeta, Tensor(), Tensor()};
  }
};

class ConvNormReluPoolFn : public torch::autograd::Function<ConvNormReluPoolFn> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight_in, const Tensor& bias_in,
                        const Tensor& gamma_in, const Tensor& beta_in, int64_t pad, double eps, bool normalize) {
    const auto xpad = torch::constant_pad_nd(x, {pad, pad, pad, pad}, 0).contiguous();
    const auto weight = weight_in.contiguous(), bias = bias_in.contiguous();
    const auto gamma = affine_param(gamma_in, normalize), beta = affine_param(beta_in, normalize);
    const int64_t n = x.size(0), c = weight.size(0);
    const Geom g = conv_geom(xpad);
    const auto a = make_args(nullptr, c, g, gamma, beta, eps, normalize);
    const auto cv = make_conv_args(xpad, weight, bias);
    auto out = torch::empty({n, c, g.Ho, g.Wo}, x.options());
    auto mean = torch::empty({n * c}, x.options()), rstd = torch::empty({n * c}, x.options());
    float *o = out.data_ptr<float>(), *m = mean.data_ptr<float>(), *r = rstd.data_ptr<float>();
    at::parallel_for(0, n * c, grain_for(g), [&](int64_t b, int64_t e) { cnrp_forward_range(a, cv, o, m, r, b, e); });
    ctx->save_for_backward({xpad, weight, bias, gamma, beta, mean, rstd});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["normalize"] = normalize;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &xpad = saved[0], &weight = saved[1], &bias = saved[2], &gamma = saved[3], &beta = saved[4];
    const auto &mean = saved[5], &rstd = saved[6];
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool normalize = ctx->saved_data["normalize"].toBool();
    const auto dout = grads[0].contiguous();
    const int64_t n = xpad.size(0), c = weight.size(0), cin = xpad.size(1), k = cin * 9;
    const Geom g = conv_geom(xpad);
    const auto a = make_args(nullptr, c, g, gamma, beta, eps, normalize);
    const auto cv = make_conv_args(xpad, weight, bias);
    auto partial = torch::empty({n * c, k + 3}, xpad.options());
    const float *m = mean.data_ptr<float>(), *r = rstd.data_ptr<float>(), *go = dout.data_ptr<float>();
    float* pp = partial.data_ptr<float>();
    at::parallel_for(0, n * c, grain_for(g),
                     [&](int64_t b, int64_t e) { cnrp_backward_range(a, cv, m, r, go, pp, b, e); });
    auto per = partial.view({n, c, k + 3}).sum(0);  // fixed-order reduction over the batch
    auto dweight = per.slice(1, 0, k).reshape(weight.sizes()).contiguous();
    auto dbias = per.select(1, k).contiguous();
    Tensor dgamma, dbeta;
    if (normalize) {
      dgamma = per.select(1, k + 1).contiguous();
      dbeta = per.select(1, k + 2).contiguous();
    }
    return {Tensor(), dweight, dbias, dgamma, dbeta, Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

bool fused_block_supported(const Tensor& x) {
  return x.defined() && x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 4 &&
         x.layout() == torch::kStrided && x.size(2) >= 2 && x.size(3) >= 2;
}

Tensor norm_relu_pool(const Tensor& x, const Tensor& gamma, const Tensor& beta, double eps, bool normalize) {
  if (!fused_block_supported(x)) throw Error("norm_relu_pool: expects a float CPU tensor [N, C, H>=2, W>=2]");
  if (normalize && (gamma.numel() != x.size(1) || beta.numel() != x.size(1))) {
    throw Error("norm_relu_pool: gamma and beta must have one entry per channel");
  }
  return NormReluPoolFn::apply(x, normalize ? gamma : Tensor(torch::empty({0})),
                               normalize ? beta : Tensor(torch::empty({0})), eps, normalize);
}

Tensor conv_norm_relu_pool(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t pad,
                           const Tensor& gamma, const Tensor& beta, double eps, bool normalize) {
  if (!fused_block_supported(x) || x.requires_grad()) {
    throw Error("conv_norm_relu_pool: expects a float CPU tensor [N, C, H, W] that does not require grad");
  }
  if (!bias.defined() || weight.dim() != 4 || weight.size(1) != x.size(1) || weight.size(2) != 3 ||
      weight.size(3) != 3 || x.size(2) + 2 * pad - 2 < 2 || x.size(3) + 2 * pad - 2 < 2) {
    throw Error("conv_norm_relu_pool: expects a biased 3x3 convolution matching the input channels");
  }
  return ConvNormReluPoolFn::apply(x, weight, bias, normalize ? gamma : Tensor(torch::empty({0})),
                                   normalize ? beta : Tensor(torch::empty({0})), pad, eps, normalize);
}

}  // namespace mdd::detail
