#include "mdd/diffusion/gaussian_diffusion.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <sstream>
#include <vector>

#include <torch/torch.h>

#include "mdd/diffusion/schedule.h"
#include "mdd/util/error.h"
#include "util/shape_str.h"

namespace mdd {
namespace {

using Vec = std::vector<double>;

// The reference keeps every schedule quantity as a float64 numpy array; the element-wise formulas
// below follow gaussian_diffusion.py:153-201 operation by operation so every bit matches. All of
// them live in one table, a row per quantity (GaussianDiffusion::Coef), so adding one is one line
// here and one enumerator.
using Coef = GaussianDiffusion::Coef;

Vec cumprod_of_alphas(const Vec& betas) {
  Vec out(betas.size());
  double acc = 1.0;
  for (size_t i = 0; i < betas.size(); ++i) {
    const double a = 1.0 - betas[i];
    acc = (i == 0) ? a : acc * a;  // numpy.cumprod: sequential left-to-right products
    out[i] = acc;
  }
  return out;
}

// float64 [Coef::kCount, n].
torch::Tensor build_schedule(const Vec& betas) {
  const size_t n = betas.size();
  for (size_t i = 0; i < n; ++i) {
    if (!(betas[i] > 0.0 && betas[i] <= 1.0)) {
      throw Error(fmt::format("diffusion schedule: beta[{}] = {} is outside (0, 1]", i, betas[i]));
    }
  }
  if (n < 2) {
    // posterior_log_variance_clipped[0] borrows element 1; the reference has no usable
    // schedule with a single step either.
    throw Error("diffusion schedule: at least 2 (respaced) timesteps are required");
  }
  auto table = torch::empty({int64_t(Coef::kCount), int64_t(n)}, torch::TensorOptions().dtype(torch::kFloat64));
  auto* base = table.data_ptr<double>();
  auto row = [&](Coef c) { return base + size_t(c) * n; };
  const Vec ac_all = cumprod_of_alphas(betas);
  for (size_t i = 0; i < n; ++i) {
    const double b = betas[i];
    const double ac = ac_all[i];
    const double acp = i == 0 ? 1.0 : ac_all[i - 1];
    const double alpha = 1.0 - b;
    row(Coef::kBetas)[i] = b;
    row(Coef::kLogBetas)[i] = std::log(b);
    row(Coef::kAlphasCumprod)[i] = ac;
    row(Coef::kAlphasCumprodPrev)[i] = acp;
    row(Coef::kSqrtAlphasCumprod)[i] = std::sqrt(ac);
    row(Coef::kSqrtOneMinusAlphasCumprod)[i] = std::sqrt(1.0 - ac);
    row(Coef::kSqrtRecipAlphasCumprod)[i] = std::sqrt(1.0 / ac);
    row(Coef::kSqrtRecipm1AlphasCumprod)[i] = std::sqrt(1.0 / ac - 1.0);
    row(Coef::kPosteriorVariance)[i] = b * (1.0 - acp) / (1.0 - ac);
    row(Coef::kPosteriorMeanCoef1)[i] = b * std::sqrt(acp) / (1.0 - ac);
    row(Coef::kPosteriorMeanCoef2)[i] = (1.0 - acp) * std::sqrt(alpha) / (1.0 - ac);
  }
  const double* pv = row(Coef::kPosteriorVariance);
  for (size_t i = 0; i < n; ++i) {
    // posterior_variance[0] == 0: the clipped log variance borrows element 1 (gaussian_diffusion.py:192).
    row(Coef::kPosteriorLogVarianceClipped)[i] = std::log(i == 0 ? pv[1] : pv[i]);
    // FIXED_LARGE: betas, with the first entry replaced by posterior_variance[1] "to get a better
    // decoder log likelihood" (gaussian_diffusion.py:290-297).
    row(Coef::kFixedLarge)[i] = (i == 0) ? pv[1] : betas[i];
    row(Coef::kFixedLargeLog)[i] = std::log(row(Coef::kFixedLarge)[i]);
  }
  return table;
}

std::vector<int64_t> flat_dims(int64_t ndim) {
  std::vector<int64_t> d;
  for (int64_t i = 1; i < ndim; ++i) d.push_back(i);
  return d;
}

// mean over all dims but the batch dim (reference mean_flat).
torch::Tensor mean_flat(const torch::Tensor& x) { return x.mean(flat_dims(x.dim())); }

// KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), same operation order as diffusion_utils.normal_kl.
torch::Tensor normal_kl(const torch::Tensor& mean1, const torch::Tensor& logvar1, const torch::Tensor& mean2,
                        const torch::Tensor& logvar2) {
  return 0.5 * (-1.0 + logvar2 - logvar1 + torch::exp(logvar1 - logvar2) +
                (mean1 - mean2).pow(2) * torch::exp(-logvar2));
}

torch::Tensor approx_standard_normal_cdf(const torch::Tensor& x) {
  return 0.5 * (1.0 + torch::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * torch::pow(x, 3))));
}

// Log-likelihood of x under a Gaussian discretised to 8-bit bins in [-1, 1] (diffusion_utils.py).
torch::Tensor discretized_gaussian_log_likelihood(const torch::Tensor& x, const torch::Tensor& means,
                                                  const torch::Tensor& log_scales) {
  const auto centered_x = x - means;
  const auto inv_stdv = torch::exp(-log_scales);
  const auto plus_in = inv_stdv * (centered_x + 1.0 / 255.0);
  const auto cdf_plus = approx_standard_normal_cdf(plus_in);
  const auto min_in = inv_stdv * (centered_x - 1.0 / 255.0);
  const auto cdf_min = approx_standard_normal_cdf(min_in);
  const auto log_cdf_plus = torch::log(cdf_plus.clamp_min(1e-12));
  const auto log_one_minus_cdf_min = torch::log((1.0 - cdf_min).clamp_min(1e-12));
  const auto cdf_delta = cdf_plus - cdf_min;
  return torch::where(x < -0.999, log_cdf_plus,
                      torch::where(x > 0.999, log_one_minus_cdf_min, torch::log(cdf_delta.clamp_min(1e-12))));
}

}  // namespace

GaussianDiffusion::GaussianDiffusion(DiffusionOptions options) : options_(std::move(options)) {
  const int64_t T = options_.num_timesteps();
  const Vec base_betas = get_named_beta_schedule(options_.noise_schedule(), T);
  const std::vector<int64_t> kept = space_timesteps(T, options_.timestep_respacing());
  // SpacedDiffusion (respace.py:81-86) rebuilds betas from the base alphas_cumprod even for the
  // identity respacing, so "" differs from the linspace in the last bits; reproduce that.
  const Vec base_ac = cumprod_of_alphas(base_betas);
  Vec new_betas;
  std::vector<int64_t> map;
  double last = 1.0;
  size_t k = 0;
  for (int64_t i = 0; i < T; ++i) {
    if (k < kept.size() && kept[k] == i) {
      new_betas.push_back(1.0 - base_ac[i] / last);
      last = base_ac[i];
      map.push_back(i);
      ++k;
    }
  }
  table_ = build_schedule(new_betas);
  for (int c = 0; c < int(Coef::kCount); ++c) rows_[size_t(c)] = table_[c];
  timestep_map_ = torch::tensor(map, torch::TensorOptions().dtype(torch::kInt64));
  fixed_variance_ = options_.sigma_small() ? Coef::kPosteriorVariance : Coef::kFixedLarge;
  fixed_log_variance_ = options_.sigma_small() ? Coef::kPosteriorLogVarianceClipped : Coef::kFixedLargeLog;
}

int64_t GaussianDiffusion::num_timesteps() const { return timestep_map_.size(0); }
torch::Tensor GaussianDiffusion::timestep_map() const { return timestep_map_.clone(); }
torch::Tensor GaussianDiffusion::coefficient(Coef c) const {
  if (int(c) < 0 || int(c) >= int(Coef::kCount)) throw Error("GaussianDiffusion::coefficient: no such row");
  return coef(c).clone();
}
torch::Tensor GaussianDiffusion::betas() const { return coef(Coef::kBetas).clone(); }
torch::Tensor GaussianDiffusion::alphas_cumprod() const { return coef(Coef::kAlphasCumprod).clone(); }
torch::Tensor GaussianDiffusion::alphas_cumprod_prev() const { return coef(Coef::kAlphasCumprodPrev).clone(); }
torch::Tensor GaussianDiffusion::posterior_variance() const { return coef(Coef::kPosteriorVariance).clone(); }
torch::Tensor GaussianDiffusion::posterior_log_variance_clipped() const {
  return coef(Coef::kPosteriorLogVarianceClipped).clone();
}
torch::Tensor GaussianDiffusion::posterior_mean_coef1() const { return coef(Coef::kPosteriorMeanCoef1).clone(); }
torch::Tensor GaussianDiffusion::posterior_mean_coef2() const { return coef(Coef::kPosteriorMeanCoef2).clone(); }

torch::Tensor GaussianDiffusion::check_t(const torch::Tensor& t, const torch::Tensor& x, const char* where) const {
  const int64_t batch = x.size(0);
  if (!t.defined() || t.dim() != 1 || t.size(0) != batch) {
    throw Error(fmt::format("GaussianDiffusion::{}: t must be a 1-D tensor of {} timesteps, got shape {}", where,
                            batch, shape_str(t)));
  }
  if (t.is_floating_point() || t.is_complex() || t.scalar_type() == torch::kBool) {
    throw Error(fmt::format("GaussianDiffusion::{}: t must be an integer tensor, got {}", where,
                            c10::toString(t.scalar_type())));
  }
  const auto t64 = t.to(x.device(), torch::kInt64);
  if (batch == 0) return t64;
  // One host sync per call; out-of-range indices would otherwise be a device assert on GPU.
  const auto mm = torch::aminmax(t64);
  const int64_t lo = std::get<0>(mm).item<int64_t>();
  const int64_t hi = std::get<1>(mm).item<int64_t>();
  if (lo < 0 || hi >= num_timesteps()) {
    throw Error(fmt::format("GaussianDiffusion::{}: timesteps must be in [0, {}) (respaced indices), got range [{}, {}]",
                            where, num_timesteps(), lo, hi));
  }
  return t64;
}

torch::Tensor GaussianDiffusion::extract(const torch::Tensor& arr, const torch::Tensor& t, int64_t ndim) const {
  // Reference _extract_into_tensor: index the float64 array, THEN cast to float32.
  std::vector<int64_t> shape(static_cast<size_t>(std::max<int64_t>(ndim, 1)), 1);
  shape[0] = t.size(0);
  return arr.to(t.device()).index_select(0, t.to(torch::kInt64)).to(torch::kFloat32).view(shape);
}

torch::Tensor GaussianDiffusion::call_model(const ModelFn& model, const torch::Tensor& x, const torch::Tensor& t,
                                            const char* where) const {
  if (!model) throw Error(fmt::format("GaussianDiffusion::{}: empty model function", where));
  // _WrappedModel: the model sees the ORIGINAL timesteps.
  const auto model_t = timestep_map_.to(t.device()).index_select(0, t.to(torch::kInt64));
  torch::Tensor out = model(x, model_t);
  const int64_t c = x.size(1);
  const int64_t expect_c = options_.learn_sigma() ? 2 * c : c;
  bool ok = out.defined() && out.dim() == x.dim() && out.size(0) == x.size(0) && out.size(1) == expect_c;
  for (int64_t d = 2; ok && d < x.dim(); ++d) ok = out.size(d) == x.size(d);
  if (!ok) {
    throw Error(fmt::format("GaussianDiffusion::{}: model output has shape {}, expected [{}, {}, spatial of x {}]{}",
                            where, shape_str(out), x.size(0), expect_c, shape_str(x),
                            options_.learn_sigma() ? " (learn_sigma: eps and variance channels)" : ""));
  }
  return out;
}

torch::Tensor GaussianDiffusion::predict_xstart_from_eps(const torch::Tensor& x_t, const torch::Tensor& t,
                                                         const torch::Tensor& eps) const {
  const int64_t nd = x_t.dim();
  return extract(coef(Coef::kSqrtRecipAlphasCumprod), t, nd) * x_t - extract(coef(Coef::kSqrtRecipm1AlphasCumprod), t, nd) * eps;
}

MeanVariance GaussianDiffusion::mean_variance_from_output(const torch::Tensor& model_output, const torch::Tensor& x,
                                                          const torch::Tensor& t, bool clip_denoised) const {
  const int64_t nd = x.dim();
  const int64_t c = x.size(1);
  MeanVariance mv;
  torch::Tensor eps;
  if (options_.learn_sigma()) {
    auto parts = torch::split(model_output, c, 1);
    eps = parts[0];
    const auto min_log = extract(coef(Coef::kPosteriorLogVarianceClipped), t, nd);
    const auto max_log = extract(coef(Coef::kLogBetas), t, nd);
    // v in [-1, 1] interpolates between the two log variances (not clamped, as the reference).
    const auto frac = (parts[1] + 1) / 2;
    mv.log_variance = frac * max_log + (1 - frac) * min_log;
    mv.variance = torch::exp(mv.log_variance);
  } else {
    eps = model_output;
    // The reference broadcasts the gathered values to x's shape.
    mv.variance = extract(coef(fixed_variance_), t, nd).expand_as(x).contiguous();
    mv.log_variance = extract(coef(fixed_log_variance_), t, nd).expand_as(x).contiguous();
  }
  mv.pred_xstart = predict_xstart_from_eps(x, t, eps);
  if (clip_denoised) mv.pred_xstart = mv.pred_xstart.clamp(-1, 1);
  mv.mean = extract(coef(Coef::kPosteriorMeanCoef1), t, nd) * mv.pred_xstart + extract(coef(Coef::kPosteriorMeanCoef2), t, nd) * x;
  return mv;
}

static void check_x(const torch::Tensor& x, const char* what, const char* where) {
  if (!x.defined() || x.dim() < 2) {
    throw Error(fmt::format("GaussianDiffusion::{}: {} must be [N, C, ...], got shape {}", where, what, shape_str(x)));
  }
  if (!x.is_floating_point()) {
    throw Error(fmt::format("GaussianDiffusion::{}: {} must be a floating tensor, got {}", where, what,
                            c10::toString(x.scalar_type())));
  }
}

static void check_same_shape(const torch::Tensor& a, const torch::Tensor& b, const char* what, const char* where) {
  if (!b.defined() || a.sizes() != b.sizes()) {
    throw Error(fmt::format("GaussianDiffusion::{}: {} has shape {}, expected the shape of x {}", where, what,
                            shape_str(b), shape_str(a)));
  }
}

torch::Tensor GaussianDiffusion::q_sample(const torch::Tensor& x0, const torch::Tensor& t_in,
                                          const torch::Tensor& noise) const {
  check_x(x0, "x0", "q_sample");
  check_same_shape(x0, noise, "noise", "q_sample");
  const auto t = check_t(t_in, x0, "q_sample");
  const int64_t nd = x0.dim();
  return extract(coef(Coef::kSqrtAlphasCumprod), t, nd) * x0 + extract(coef(Coef::kSqrtOneMinusAlphasCumprod), t, nd) * noise;
}

MeanVariance GaussianDiffusion::p_mean_variance(const ModelFn& model, const torch::Tensor& x, const torch::Tensor& t_in,
                                                bool clip_denoised) const {
  check_x(x, "x", "p_mean_variance");
  const auto t = check_t(t_in, x, "p_mean_variance");
  const auto out = call_model(model, x, t, "p_mean_variance");
  return mean_variance_from_output(out, x, t, clip_denoised);
}

torch::Tensor GaussianDiffusion::p_sample(const ModelFn& model, const torch::Tensor& x, const torch::Tensor& t_in,
                                          const torch::Tensor& noise, bool clip_denoised) const {
  check_x(x, "x", "p_sample");
  check_same_shape(x, noise, "noise", "p_sample");
  const auto t = check_t(t_in, x, "p_sample");
  const auto out = mean_variance_from_output(call_model(model, x, t, "p_sample"), x, t, clip_denoised);
  std::vector<int64_t> mshape(static_cast<size_t>(x.dim()), 1);
  mshape[0] = x.size(0);
  const auto nonzero_mask = (t != 0).to(torch::kFloat32).view(mshape);
  return out.mean + nonzero_mask * torch::exp(0.5 * out.log_variance) * noise;
}

torch::Tensor GaussianDiffusion::ddim_sample(const ModelFn& model, const torch::Tensor& x, const torch::Tensor& t_in,
                                             const torch::Tensor& noise, double eta, bool clip_denoised) const {
  check_x(x, "x", "ddim_sample");
  check_same_shape(x, noise, "noise", "ddim_sample");
  const auto t = check_t(t_in, x, "ddim_sample");
  if (!(eta >= 0.0) || !std::isfinite(eta)) {
    throw Error(fmt::format("GaussianDiffusion::ddim_sample: eta must be finite and >= 0, got {}", eta));
  }
  const int64_t nd = x.dim();
  const auto out = mean_variance_from_output(call_model(model, x, t, "ddim_sample"), x, t, clip_denoised);
  // Re-derive eps from the (possibly clipped) x0 prediction, as the reference does.
  const auto eps = (extract(coef(Coef::kSqrtRecipAlphasCumprod), t, nd) * x - out.pred_xstart) /
                   extract(coef(Coef::kSqrtRecipm1AlphasCumprod), t, nd);
  const auto alpha_bar = extract(coef(Coef::kAlphasCumprod), t, nd);
  const auto alpha_bar_prev = extract(coef(Coef::kAlphasCumprodPrev), t, nd);
  // float32 arithmetic on the gathered values, in the reference's order.
  const auto sigma =
      eta * torch::sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch::sqrt(1 - alpha_bar / alpha_bar_prev);
  const auto mean_pred =
      out.pred_xstart * torch::sqrt(alpha_bar_prev) + torch::sqrt(1 - alpha_bar_prev - sigma.pow(2)) * eps;
  std::vector<int64_t> mshape(static_cast<size_t>(nd), 1);
  mshape[0] = x.size(0);
  const auto nonzero_mask = (t != 0).to(torch::kFloat32).view(mshape);
  return mean_pred + nonzero_mask * sigma * noise;
}

TrainingLosses GaussianDiffusion::training_losses(const ModelFn& model, const torch::Tensor& x0,
                                                  const torch::Tensor& t_in, const torch::Tensor& noise) const {
  check_x(x0, "x0", "training_losses");
  check_same_shape(x0, noise, "noise", "training_losses");
  const auto t = check_t(t_in, x0, "training_losses");
  const int64_t c = x0.size(1);
  const int64_t nd0 = x0.dim();
  const auto x_t =
      extract(coef(Coef::kSqrtAlphasCumprod), t, nd0) * x0 + extract(coef(Coef::kSqrtOneMinusAlphasCumprod), t, nd0) * noise;
  const auto model_output = call_model(model, x_t, t, "training_losses");
  TrainingLosses terms;
  torch::Tensor eps;
  if (options_.learn_sigma()) {
    auto parts = torch::split(model_output, c, 1);
    eps = parts[0];
    // VB with a frozen mean: it only trains the variance channels (gaussian_diffusion.py:755-765).
    const auto frozen_out = torch::cat({eps.detach(), parts[1]}, 1);
    const auto out = mean_variance_from_output(frozen_out, x_t, t, /*clip_denoised=*/false);
    const int64_t nd = x_t.dim();
    const auto true_mean =
        extract(coef(Coef::kPosteriorMeanCoef1), t, nd) * x0 + extract(coef(Coef::kPosteriorMeanCoef2), t, nd) * x_t;
    const auto true_log_variance_clipped = extract(coef(Coef::kPosteriorLogVarianceClipped), t, nd).expand_as(x_t);
    const double ln2 = std::log(2.0);
    const auto kl = mean_flat(normal_kl(true_mean, true_log_variance_clipped, out.mean, out.log_variance)) / ln2;
    const auto decoder_nll =
        mean_flat(-discretized_gaussian_log_likelihood(x0, out.mean, 0.5 * out.log_variance)) / ln2;
    terms.vb = torch::where(t == 0, decoder_nll, kl);
  } else {
    eps = model_output;
  }
  terms.mse = mean_flat((noise - eps).pow(2));
  // MinimaxDiffusion's addition (gaussian_diffusion.py:779): x0 from eps, unclipped, with grad.
  terms.pred_xstart = predict_xstart_from_eps(x_t, t, eps);
  if (terms.vb.defined()) {
    terms.loss = terms.mse + terms.vb;
  } else {
    terms.vb = torch::zeros_like(terms.mse);
    terms.loss = terms.mse;
  }
  return terms;
}

namespace {
template <typename Step>
torch::Tensor run_loop(const GaussianDiffusion& d, const torch::Tensor& noise, const StepNoiseFn& step_noise,
                       const ProgressFn& progress, const char* where, Step&& step) {
  if (!noise.defined() || noise.dim() < 2) {
    throw Error(fmt::format("GaussianDiffusion::{}: initial noise must be [N, C, ...], got {}", where,
                            shape_str(noise)));
  }
  if (!step_noise) throw Error(fmt::format("GaussianDiffusion::{}: empty step-noise function", where));
  torch::NoGradGuard no_grad;
  const auto start = std::chrono::steady_clock::now();
  const int64_t S = d.num_timesteps();
  torch::Tensor img = noise;
  for (int64_t k = 0; k < S; ++k) {
    const int64_t i = S - 1 - k;
    const auto t = torch::full({img.size(0)}, i, torch::TensorOptions().dtype(torch::kInt64).device(img.device()));
    img = step(img, t, step_noise(k, img));
    if (progress) {
      const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      progress(Progress{"sample", k + 1, S, el});
    }
  }
  return img;
}
}  // namespace

torch::Tensor GaussianDiffusion::p_sample_loop(const ModelFn& model, const torch::Tensor& noise,
                                               const StepNoiseFn& step_noise, bool clip_denoised,
                                               const ProgressFn& progress) const {
  return run_loop(*this, noise, step_noise, progress, "p_sample_loop",
                  [&](const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& n) {
                    return p_sample(model, x, t, n, clip_denoised);
                  });
}

torch::Tensor GaussianDiffusion::ddim_sample_loop(const ModelFn& model, const torch::Tensor& noise,
                                                  const StepNoiseFn& step_noise, double eta, bool clip_denoised,
                                                  const ProgressFn& progress) const {
  return run_loop(*this, noise, step_noise, progress, "ddim_sample_loop",
                  [&](const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& n) {
                    return ddim_sample(model, x, t, n, eta, clip_denoised);
                  });
}

}  // namespace mdd
