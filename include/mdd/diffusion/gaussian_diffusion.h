#pragma once
/// \file
/// Gaussian diffusion (DDPM with learned-range variance and epsilon prediction), a port of the
/// reference `SpacedDiffusion` built by DiT's `create_diffusion` (MinimaxDiffusion's copy adds the
/// x0 prediction used as the minimax embedding).

#include <array>
#include <cstdint>
#include <functional>
#include <string>

#include <torch/arg.h>
#include <torch/types.h>

#include "mdd/export.h"
#include "mdd/util/progress.h"

namespace mdd {

/// Configuration of a `GaussianDiffusion`, defaults as the reference `create_diffusion`.
struct MDD_API DiffusionOptions {
  /// Number of steps of the original (training) process.
  TORCH_ARG(int64_t, num_timesteps) = 1000;
  /// Respacing: "" (all steps), "50", "250", "10,15,20" (sections) or "ddimN" (see space_timesteps).
  TORCH_ARG(std::string, timestep_respacing) = "";
  /// true: the model outputs 2C channels (eps, v) and the variance is the learned-range
  /// interpolation; false: C channels (eps) and a fixed variance.
  TORCH_ARG(bool, learn_sigma) = true;
  /// Beta schedule name ("linear" or "squaredcos_cap_v2"), see get_named_beta_schedule.
  TORCH_ARG(std::string, noise_schedule) = "linear";
  /// Only with learn_sigma = false: FIXED_SMALL (posterior variance) instead of FIXED_LARGE (betas).
  TORCH_ARG(bool, sigma_small) = false;
};

/// The denoiser: (x_t [N,C,H,W], t [N] int64) -> [N,2C,H,W] (learn_sigma) or [N,C,H,W].
/// t passed to ModelFn are ORIGINAL timesteps (timestep_map applied), as the reference does.
/// Class labels, CFG etc. are captured by the callable.
using ModelFn = std::function<torch::Tensor(const torch::Tensor& x, const torch::Tensor& t)>;

/// Output of p_mean_variance (float32, shape of x).
struct MDD_API MeanVariance {
  torch::Tensor mean, variance, log_variance, pred_xstart;
};

/// Output of training_losses: per-sample terms [N] and the x0 prediction [N,C,H,W] that keeps its
/// graph to the model's eps output (the minimax embedding).
struct MDD_API TrainingLosses {
  torch::Tensor loss, mse, vb, pred_xstart;
};

/// Returns the noise for the `k`-th step of a sampling loop (k = 0 is the first step, at the
/// largest t); `x` is the current sample (for shape/device). Used by the convenience loops.
using StepNoiseFn = std::function<torch::Tensor(int64_t k, const torch::Tensor& x)>;

/// A respaced Gaussian diffusion process. All schedule buffers are float64 (as the reference's
/// numpy arrays); per-timestep values are gathered in float64 and cast to float32 before they
/// touch a tensor, exactly like the reference `_extract_into_tensor`. Timesteps `t` given to the
/// methods are RESPACED indices in [0, num_timesteps()); the model receives timestep_map()[t].
/// Immutable after construction, so one instance can be shared by threads.
class MDD_API GaussianDiffusion {
 public:
  /// The schedule quantities of gaussian_diffusion.py:153-201 (plus FIXED_LARGE's variance and its
  /// log), each a float64 row of one table over the (respaced) timesteps.
  enum class Coef : int {
    kBetas, kLogBetas, kAlphasCumprod, kAlphasCumprodPrev, kSqrtAlphasCumprod, kSqrtOneMinusAlphasCumprod,
    kSqrtRecipAlphasCumprod, kSqrtRecipm1AlphasCumprod, kPosteriorVariance, kPosteriorLogVarianceClipped,
    kPosteriorMeanCoef1, kPosteriorMeanCoef2, kFixedLarge, kFixedLargeLog,
    kCount  ///< number of rows
  };

  /// Builds the schedule; throws mdd::Error for a bad respacing string or schedule.
  explicit GaussianDiffusion(DiffusionOptions options = {});

  /// A copy of row `c` of the schedule table (float64 [num_timesteps()]).
  torch::Tensor coefficient(Coef c) const;

  /// The options it was built with.
  const DiffusionOptions& options() const { return options_; }
  /// Number of steps after respacing.
  int64_t num_timesteps() const;
  /// Number of steps of the original process (options().num_timesteps()).
  int64_t original_num_steps() const { return options_.num_timesteps(); }
  /// Respaced index -> original timestep fed to the model, int64 [num_timesteps()].
  torch::Tensor timestep_map() const;

  /// Respaced betas (recomputed from alphas_cumprod as SpacedDiffusion does), float64.
  torch::Tensor betas() const;
  /// Cumulative product of (1 - betas), float64.
  torch::Tensor alphas_cumprod() const;
  /// [1, alphas_cumprod[:-1]], float64.
  torch::Tensor alphas_cumprod_prev() const;
  /// Variance of q(x_{t-1} | x_t, x_0), float64.
  torch::Tensor posterior_variance() const;
  /// log(posterior_variance) with element 0 replaced by element 1 (which is > 0), float64.
  torch::Tensor posterior_log_variance_clipped() const;
  /// Coefficient of x_0 in the posterior mean, float64.
  torch::Tensor posterior_mean_coef1() const;
  /// Coefficient of x_t in the posterior mean, float64.
  torch::Tensor posterior_mean_coef2() const;

  /// x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.
  torch::Tensor q_sample(const torch::Tensor& x0, const torch::Tensor& t, const torch::Tensor& noise) const;

  /// Mean and variance of p(x_{t-1} | x_t): model eps -> x0 prediction (clamped to [-1,1] when
  /// clip_denoised) -> posterior mean; learned-range or fixed variance.
  MeanVariance p_mean_variance(const ModelFn& model, const torch::Tensor& x, const torch::Tensor& t,
                               bool clip_denoised = false) const;

  /// One ancestral step: mean + [t != 0] * exp(0.5 log_variance) * noise. `noise` (shape of x) is
  /// the step's N(0, I) draw; it is ignored (masked) where t == 0.
  torch::Tensor p_sample(const ModelFn& model, const torch::Tensor& x, const torch::Tensor& t,
                         const torch::Tensor& noise, bool clip_denoised = false) const;

  /// One DDIM step with stochasticity `eta` (0 = deterministic); `noise` as in p_sample.
  torch::Tensor ddim_sample(const ModelFn& model, const torch::Tensor& x, const torch::Tensor& t,
                            const torch::Tensor& noise, double eta = 0.0, bool clip_denoised = false) const;

  /// The reference training loss for (respaced) timesteps t and explicit noise:
  /// mse = mean_flat((noise - eps)^2); vb (learn_sigma only, else zeros) = the variational bound
  /// in bits computed with the eps channels detached (normal KL to the true posterior for t > 0,
  /// discretized Gaussian decoder NLL at t == 0); loss = mse + vb; pred_xstart = x0 predicted
  /// from eps, NOT clipped and WITH gradient (MinimaxDiffusion's embedding).
  TrainingLosses training_losses(const ModelFn& model, const torch::Tensor& x0, const torch::Tensor& t,
                                 const torch::Tensor& noise) const;

  /// Full ancestral loop from `noise` (x_T) over t = num_timesteps()-1 .. 0 under no_grad;
  /// `step_noise(k, x)` supplies the k-th step's noise. Progress: stage "sample", one per step.
  torch::Tensor p_sample_loop(const ModelFn& model, const torch::Tensor& noise, const StepNoiseFn& step_noise,
                              bool clip_denoised = false, const ProgressFn& progress = {}) const;

  /// Full DDIM loop, as p_sample_loop but with ddim_sample steps.
  torch::Tensor ddim_sample_loop(const ModelFn& model, const torch::Tensor& noise, const StepNoiseFn& step_noise,
                                 double eta = 0.0, bool clip_denoised = false,
                                 const ProgressFn& progress = {}) const;

  /// Gathers arr[t] (arr float64 [num_timesteps()]) as float32 shaped [N, 1, ..., 1] with `ndim`
  /// dimensions; the reference `_extract_into_tensor` (validates t).
  torch::Tensor extract(const torch::Tensor& arr, const torch::Tensor& t, int64_t ndim) const;

 private:
  torch::Tensor check_t(const torch::Tensor& t, const torch::Tensor& x, const char* where) const;
  torch::Tensor call_model(const ModelFn& model, const torch::Tensor& x, const torch::Tensor& t,
                           const char* where) const;
  MeanVariance mean_variance_from_output(const torch::Tensor& model_output, const torch::Tensor& x,
                                         const torch::Tensor& t, bool clip_denoised) const;
  torch::Tensor predict_xstart_from_eps(const torch::Tensor& x_t, const torch::Tensor& t,
                                        const torch::Tensor& eps) const;

  const torch::Tensor& coef(Coef c) const { return rows_[size_t(c)]; }

  DiffusionOptions options_;
  torch::Tensor timestep_map_;
  torch::Tensor table_;                               // float64 [Coef::kCount, num_timesteps()]
  std::array<torch::Tensor, size_t(Coef::kCount)> rows_;  // row views of table_, one per Coef
  Coef fixed_variance_, fixed_log_variance_;           // the rows FIXED_SMALL / FIXED_LARGE use
};

}  // namespace mdd
