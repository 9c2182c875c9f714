#pragma once
/// \file
/// Batched, reproducible class-conditional sampling with classifier-free guidance (the reference
/// MinimaxDiffusion `sample.py` loop, batched).

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <torch/arg.h>
#include <torch/types.h>

#include "mdd/diffusion/gaussian_diffusion.h"
#include "mdd/diffusion/guidance.h"
#include "mdd/dist/process_group.h"
#include "mdd/export.h"
#include "mdd/util/option_check.h"
#include "mdd/util/precision.h"
#include "mdd/util/progress.h"

namespace mdd {

/// The raw class-conditional network: x [N,C,H,W], t [N] int64 ORIGINAL timesteps, y [N] int64
/// labels -> [N, 2C, H, W] (learn_sigma) or [N, C, H, W]. E.g. a lambda over `DiT::forward`.
using ConditionalModelFn =
    std::function<torch::Tensor(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& y)>;

/// The reverse process the sampler runs.
enum class SamplingMethod {
  kDDPM,  ///< ancestral p_sample loop (reference sample.py)
  kDDIM,  ///< ddim_sample loop with SamplerOptions::eta
};

/// "ddpm" / "ddim" (the config's `sample.method`).
MDD_API const char* sampling_method_name(SamplingMethod m);
/// Inverse of `sampling_method_name`; throws `mdd::Error` listing the valid names.
MDD_API SamplingMethod parse_sampling_method(const std::string& name);

/// Options of a `Sampler`; defaults follow MinimaxDiffusion's sample.py except batch_size (the
/// reference hard-codes 1; batching only changes throughput, see the seeding scheme).
struct MDD_API SamplerOptions {
  /// Images denoised together per model call (the CFG forward sees 2x this batch).
  TORCH_ARG(int64_t, batch_size) = 16;
  /// The process sampled: the model's training process (steps, schedule, learn_sigma: DiT
  /// outputs learned-range variance channels) respaced to the sampling steps ("50" = 50 respaced
  /// steps, "ddim25", "10,15,20", ...).
  TORCH_ARG(DiffusionOptions, diffusion) = DiffusionOptions().timestep_respacing("50");
  /// Guidance scale s: eps = uncond + s * (cond - uncond). Exactly 1.0 skips the unconditional
  /// half (mathematically identical, half the cost).
  TORCH_ARG(double, cfg_scale) = 4.0;
  /// Guidance interval [lo, hi] in the model's training timesteps (0 = clean, num_timesteps - 1 =
  /// pure noise): guidance applies only at steps whose timestep t has lo <= t <= hi; the others use
  /// the conditional output alone (and skip the unconditional half). Empty (default, the reference):
  /// every step. Guiding only the middle of the process keeps guidance's class fidelity while the
  /// unguided high-noise steps keep the samples' diversity (Kynkaenniemi et al., NeurIPS 2024).
  TORCH_ARG(std::vector<int64_t>, cfg_interval) = std::vector<int64_t>{};
  /// Label of the unconditional ("null") class; DiT uses num_classes (1000 for ImageNet).
  TORCH_ARG(int64_t, null_class) = 1000;
  /// Guided channels (reference 3-channel rule by default).
  TORCH_ARG(CfgGuidance, guidance) = CfgGuidance::kReference3Channels;
  /// Ancestral DDPM (reference) or DDIM.
  TORCH_ARG(SamplingMethod, method) = SamplingMethod::kDDPM;
  /// DDIM stochasticity (0 = deterministic); ignored for DDPM.
  TORCH_ARG(double, eta) = 0.0;
  /// Clamp the x0 prediction to [-1, 1] at each step (reference sample.py: false).
  TORCH_ARG(bool, clip_denoised) = false;
  /// Master seed; see Sampler for how per-image streams derive from it.
  TORCH_ARG(uint64_t, seed) = 0;
  /// Latent shape [C, H, W] of one image (DiT-XL/2 at 256 px: 4 x 32 x 32).
  TORCH_ARG(std::vector<int64_t>, latent_shape) = std::vector<int64_t>{4, 32, 32};
  /// Device the latents live on and the model runs on.
  TORCH_ARG(torch::Device, device) = torch::Device(torch::kCPU);
  /// Precision of the model calls (autocast around each call; its output is cast back to
  /// float32 and the diffusion arithmetic stays float32). kAuto: bf16 where it is fast.
  TORCH_ARG(Precision, precision) = Precision::kFP32;
  /// The processes that sample together (default: this process alone). With W > 1, `sample`
  /// is collective: rank r denoises batches r, r + W, r + 2W, ... of the single-process batch
  /// sequence, and every rank returns the whole result, gathered in order. Since each batch is
  /// the same batch a single process would run, the result is bit-identical to the single-process
  /// one wherever the model's kernels are deterministic for a given batch.
  TORCH_ARG(dist::ProcessGroup, process_group) = dist::ProcessGroup();

 public:
  /// Alias of `diffusion().timestep_respacing()` (kept so existing code compiles).
  SamplerOptions& timestep_respacing(std::string respacing) {
    diffusion_.timestep_respacing(std::move(respacing));
    return *this;
  }
  /// Alias of `diffusion().timestep_respacing()`.
  const std::string& timestep_respacing() const noexcept { return diffusion_.timestep_respacing(); }
  /// Alias of `diffusion().num_timesteps()` (steps of the process the model was trained with).
  SamplerOptions& diffusion_steps(int64_t steps) {
    diffusion_.num_timesteps(steps);
    return *this;
  }
  /// Alias of `diffusion().num_timesteps()`.
  int64_t diffusion_steps() const noexcept { return diffusion_.num_timesteps(); }
  /// Alias of `diffusion().learn_sigma()`.
  SamplerOptions& learn_sigma(bool learn) {
    diffusion_.learn_sigma(learn);
    return *this;
  }
  /// Alias of `diffusion().learn_sigma()`.
  bool learn_sigma() const noexcept { return diffusion_.learn_sigma(); }
  /// Alias of `diffusion().noise_schedule()`.
  SamplerOptions& noise_schedule(std::string schedule) {
    diffusion_.noise_schedule(std::move(schedule));
    return *this;
  }
  /// Alias of `diffusion().noise_schedule()`.
  const std::string& noise_schedule() const noexcept { return diffusion_.noise_schedule(); }
};

/// The rules `Sampler` applies to its options (batch_size >= 1, finite non-negative cfg_scale and eta,
/// a [C, H, W] latent_shape, a null class for guidance); each broken one goes to `fail`.
MDD_API void check_options(const SamplerOptions& o, const OptionFail& fail);

/// Draws latents for given labels with any class-conditional model.
///
/// Guidance: for a batch x with labels y the model is called once on [x, x] with labels
/// [y, null_class]; guided eps = uncond + s * (cond - uncond) on the guided channels, every other
/// channel taken from the conditional half. For the kept (first) half this equals the reference
/// `forward_with_cfg` + `p_sample_loop` of sample.py, whose second half is discarded.
///
/// Seeding: image number `id` (by default its position in `labels`; callers that shard work pass
/// global ids) owns a CPU generator seeded with `image_seed(seed, id)` (splitmix64 mixing). Its
/// initial noise x_T [C,H,W] is the first draw from that generator, and the k-th step's noise the
/// (k+2)-th draw, also at t = 0 where it is masked out. Hence the same seed and id give the same
/// latent whatever the batch size, batch composition, order or device (up to the model's own
/// numerics, which may depend on batch size in the last bits). Images do not match the reference
/// sample.py bit for bit: it draws from one global stream in generation order.
class MDD_API Sampler {
 public:
  /// Throws mdd::Error for an empty model, a bad respacing or invalid options.
  Sampler(ConditionalModelFn model, SamplerOptions options = {});

  /// Latents [N, C, H, W] for labels [N] (int64), image ids 0..N-1. Progress: stage "sample",
  /// one event per denoising step of each batch this rank runs (total = its batches x steps).
  /// Collective with a process group of several ranks (see SamplerOptions::process_group).
  torch::Tensor sample(const torch::Tensor& labels, const ProgressFn& progress = {}) const;

  /// As above with explicit per-image stream ids [N] (int64, e.g. class * ipc + k).
  torch::Tensor sample(const torch::Tensor& labels, const torch::Tensor& image_ids,
                       const ProgressFn& progress = {}) const;

  /// One batch from explicit noise: x_T [N,C,H,W] and step_noise(k, x) for step k (k = 0 at the
  /// largest t). No batching, no generators; for reproducing a reference run or custom noise.
  torch::Tensor sample_from_noise(const torch::Tensor& labels, const torch::Tensor& x_T, const StepNoiseFn& step_noise,
                                  const ProgressFn& progress = {}) const;

  /// The guided denoiser for one batch of labels (what the diffusion loop calls).
  ModelFn guided_model(const torch::Tensor& labels) const;

  /// The respaced diffusion used for sampling.
  const GaussianDiffusion& diffusion() const { return diffusion_; }
  /// The options.
  const SamplerOptions& options() const { return options_; }

  /// Seed of image `image_id`'s generator: splitmix64(seed ^ splitmix64(image_id)).
  static uint64_t image_seed(uint64_t seed, int64_t image_id);

 private:
  torch::Tensor check_labels(const torch::Tensor& labels) const;
  torch::Tensor gather_batches(dist::ProcessGroup& pg, const std::vector<torch::Tensor>& outs, int64_t n) const;
  torch::Tensor run(const torch::Tensor& labels, const torch::Tensor& x_T, const StepNoiseFn& step_noise,
                    const ProgressFn& on_step) const;

  ConditionalModelFn model_;
  SamplerOptions options_;
  GaussianDiffusion diffusion_;
};

}  // namespace mdd
