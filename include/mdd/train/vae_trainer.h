#pragma once
/// \file
/// Training a small `AutoencoderKL` from scratch (reconstruction + KL), for domains without a
/// released VAE, so the DiT can run in a latent space as in the paper (e.g. Fashion-MNIST:
/// 28 x 28 x 1 images -> 7 x 7 x 4 latents with three resolution levels).
///
/// One step: a batch of images in [-1, 1] (optionally mirrored), posterior q(z|x) from the
/// encoder, z ~ q by the reparameterisation trick, x̂ = decoder(z);
/// loss = mean |x̂ - x| (or squared) + kl_weight * mean KL(q || N(0, I)) (per latent element).
/// No perceptual or adversarial terms: for small grey images the L1 reconstruction is sharp enough
/// and keeps the trainer free of extra networks. Every draw of step s comes from a generator
/// seeded from (seed, s), the epoch order from (seed, epoch): resume continues bit for bit (CPU).
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include <torch/arg.h>
#include <torch/types.h>

#include "mdd/data/labeled_images.h"
#include "mdd/dist/process_group.h"
#include "mdd/export.h"
#include "mdd/models/autoencoder_kl.h"
#include "mdd/train/adamw.h"
#include "mdd/util/option_check.h"
#include "mdd/util/precision.h"
#include "mdd/util/progress.h"

namespace mdd {
namespace detail {
class OverlappedGradAverager;
}  // namespace detail

/// Reconstruction error of `VaeTrainer`: mean absolute (`kL1`, sharper for small grey images) or
/// mean squared (`kMse`). `VaeTrainerOptions::reconstruction` holds its name.
enum class ReconstructionLoss { kL1, kMse };
/// "l1" / "mse".
MDD_API const char* reconstruction_loss_name(ReconstructionLoss r);
/// Inverse of `reconstruction_loss_name`; throws `mdd::Error` listing the valid names.
MDD_API ReconstructionLoss parse_reconstruction_loss(const std::string& name);

/// Options of `VaeTrainer`.
struct MDD_API VaeTrainerOptions {
  /// Optimiser steps in total.
  TORCH_ARG(int64_t, steps) = 4000;
  /// Images per step.
  TORCH_ARG(int64_t, batch_size) = 64;
  /// AdamW learning rate (constant after `lr_warmup` linear warm-up steps).
  TORCH_ARG(double, lr) = 1e-3;
  TORCH_ARG(int64_t, lr_warmup) = 100;
  /// Weight of the mean per-element KL divergence against the mean per-element reconstruction
  /// error. Small values give sharp reconstructions; the KL only keeps the latent scale tame.
  TORCH_ARG(double, kl_weight) = 1e-4;
  /// "l1" or "mse" reconstruction error.
  TORCH_ARG(std::string, reconstruction) = "l1";
  /// Mirror each image horizontally with probability 1/2 (the DiT trains on both views too).
  TORCH_ARG(bool, hflip) = true;
  /// Seed of the data order and of every per-step draw.
  TORCH_ARG(uint64_t, seed) = 0;
  /// Checkpoint every this many steps into `checkpoint_dir` (0 = only at the end; "" = none).
  TORCH_ARG(int64_t, ckpt_every) = 500;
  TORCH_ARG(std::string, checkpoint_dir) = "";
  TORCH_ARG(int64_t, keep_checkpoints) = 2;
  /// Steps between VaeTrainStats reports (0 = never).
  TORCH_ARG(int64_t, log_every) = 100;
  TORCH_ARG(torch::Device, device) = torch::Device(torch::kCPU);
  /// Precision of encoder/decoder forward and backward (weights, optimizer and loss stay fp32).
  TORCH_ARG(Precision, precision) = Precision::kFP32;
  /// false: fine-tune the decoder side only (`decoder`, `post_quant_conv`); the encoder and
  /// `quant_conv` are frozen and left out of the optimiser. The latent space is then unchanged, so
  /// a DiT already trained on it, its latent cache and the scaling factor stay valid while the
  /// reconstructions sharpen (what Stability did for sd-vae-ft-mse). The KL term is reported but
  /// has no gradient in this mode.
  TORCH_ARG(bool, train_encoder) = true;
  /// Data parallel over the ranks of this group (world size W > 1; see `FinetuneOptions` for the
  /// scheme): every rank draws the whole global batch as one process would and trains on rows
  /// [r·B/W, (r+1)·B/W) (`batch_size` must be a multiple of W); gradients are averaged, so the
  /// result is the single-process one up to float summation order. Rank 0 writes the checkpoints;
  /// every rank must construct the trainer with the same options, VAE and images (checked).
  TORCH_ARG(dist::ProcessGroup, process_group) = dist::ProcessGroup();
  /// Gradient all-reduce bucket size in bytes (0 = one bucket).
  TORCH_ARG(int64_t, grad_bucket_bytes) = int64_t(25) << 20;
  /// Start each bucket's all-reduce during the backward, as soon as its gradients are there
  /// (DistributedDataParallel's overlap), instead of all buckets after it. Same averages either
  /// way; only the waiting shrinks. Only used with more than one process.
  TORCH_ARG(bool, overlap_grad_reduce) = true;
};

/// The rules `VaeTrainer` applies to its options alone (sizes, rates, a known reconstruction loss);
/// each broken one goes to `fail`.
MDD_API void check_options(const VaeTrainerOptions& o, const OptionFail& fail);

/// Losses of one step (host values).
struct MDD_API VaeTrainStats {
  int64_t step = 0, total = 0;
  double loss = 0, reconstruction = 0, kl = 0;
  double mean_loss = 0;      ///< mean total loss since the previous report
  double images_per_s = 0;   ///< throughput since the previous report
  double elapsed_s = 0;      ///< since train() started
  double communication_s = 0;  ///< seconds in collectives since the previous report (several ranks)
};
/// Receives VaeTrainStats every `log_every` steps.
using VaeTrainLogFn = std::function<void(const VaeTrainStats&)>;

/// Trains an AutoencoderKL on labelled (or unlabelled) uint8 images [N, H, W, C].
class MDD_API VaeTrainer {
 public:
  /// Throws mdd::Error when the images do not fit the VAE (channels, H and W multiples of the
  /// downsampling factor) or the options are invalid.
  VaeTrainer(AutoencoderKL vae, LabeledImages images, VaeTrainerOptions options = {});
  /// Loads the newest readable checkpoint of `checkpoint_dir`; false when there is none. Throws
  /// mdd::Error when it was written with other loop settings (names the key).
  /// Temporary files of killed runs in `checkpoint_dir` are removed first; skipped checkpoints, the
  /// step fallen back to and "starting from step 0" are reported through `log`.
  bool resume(const LogFn& log = {});
  /// Runs until `steps` are done (checkpoints as configured, one at the end). Progress stage
  /// `stage`, one event per step. A NaN/Inf loss throws mdd::Error naming the step.
  void train(const ProgressFn& progress = {}, const VaeTrainLogFn& log = {}, const std::string& stage = "train_vae");
  /// One step.
  VaeTrainStats step();
  /// Writes a checkpoint (model + optimizer); returns its weights path.
  std::string save_checkpoint();
  int64_t step_count() const { return step_; }
  AutoencoderKL vae() const { return vae_; }
  const VaeTrainerOptions& options() const { return options_; }

 private:
  AutoencoderKL vae_;
  LabeledImages data_;
  VaeTrainerOptions options_;
  Precision precision_;
  ReconstructionLoss reconstruction_ = ReconstructionLoss::kL1;
  std::unique_ptr<AdamW> optimizer_;
  int64_t step_ = 0;
  std::vector<torch::Tensor> trained_;  // parameters in the optimiser (all, or the decoder side)
  double comm_s_ = 0;                   // seconds in collectives since the last report
  std::shared_ptr<detail::OverlappedGradAverager> averager_;  // set with several ranks and overlap
  mutable torch::Tensor order_;
  mutable int64_t order_epoch_ = -1;
  std::string write_own_checkpoint();
  bool resume_own(const LogFn& log);
};

/// uint8 images [N, H, W, C] -> float [N, C, H, W] in [-1, 1] (ToTensor + Normalize(0.5, 0.5)).
MDD_API torch::Tensor images_to_unit_range(const torch::Tensor& images_u8);

/// Reconstruction quality of `vae` on uint8 images [N, H, W, C]: the posterior mean decoded,
/// clamped to [-1, 1] and rounded to uint8 as an image file would be; returns PSNR in dB over
/// all pixels and the reconstructed uint8 images in `reconstructions` (when given).
MDD_API double reconstruction_psnr(AutoencoderKL vae, const torch::Tensor& images_u8, torch::Tensor* reconstructions = nullptr,
                                   int64_t batch_size = 256);

/// The latent scaling factor for `vae` on these images: 1 / std of the posterior means (the LDM
/// rule, so scaled latents have unit variance like the diffusion noise), from at most `max_images`.
MDD_API double fit_scaling_factor(AutoencoderKL vae, const torch::Tensor& images_u8, int64_t max_images = 5000);

/// Writes `vae` as a diffusers folder (`config.json` + `diffusion_pytorch_model.safetensors`),
/// readable by `AutoencoderKL::from_pretrained` and hence by the pipeline's `codec.encoder`.
/// `metadata` is added to the weights file's safetensors header ("format" is always "pt"). The
/// weights are written last, each file atomically, so a folder whose weights carry a given
/// metadata entry also has the config written with them.
MDD_API void save_pretrained(const AutoencoderKL& vae, const std::string& dir,
                             const std::map<std::string, std::string>& metadata = {});

}  // namespace mdd
