#pragma once
/// \file
/// The Minimax-Diffusion fine-tuning loop (reference MinimaxDiffusion train_dit.py) and the same
/// loop for pre-training a DiT from scratch.
///
/// One step (train_dit.py:233-285): draw a batch of latents z0 with local labels ry and model
/// labels y; t ~ U{0..T-1}; label dropout (prob. `class_dropout_prob`, null class) on y;
/// `training_losses` (eps MSE + VB) gives the loss and x̂0 = pred_xstart; with minimax on, for
/// every class c in the batch whose generated memory is not empty add
/// [λr (1 − min cos(x̂0_c, real_c)) + λd max cos(x̂0_c, generated_c)] / |classes in batch|;
/// backward, AdamW step, EMA update of all parameters; then push z0 into the real memory and the
/// detached x̂0 into the generated memory of their local class (after the loss, so a batch is
/// never compared with itself).
///
/// Randomness: every draw of step s (batch order excepted) comes from one CPU generator seeded
/// with a hash of (seed, s), and the batch order of epoch e from (seed, e). A run resumed from a
/// checkpoint therefore continues exactly as the uninterrupted run would (bit for bit on CPU).
///
/// Data parallel (`FinetuneOptions::process_group` of world size W > 1): every rank draws the
/// inputs of the whole global batch exactly as one process would and computes the rows
/// [r·B/W, (r+1)·B/W) of it; gradients are averaged across ranks; the minimax terms see the whole
/// batch's x̂0 (all-gathered) and the memories receive the whole batch, so every rank holds the
/// banks a single process would. The draws therefore do not depend on the rank or on W (the
/// reference seeds each rank with global_seed·W + rank instead, so its result changes with W):
/// a run gives the same result, up to float summation order, on any number of processes, and
/// its checkpoints (written by rank 0 only) resume with the same or another world size.
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>

#include <torch/arg.h>
#include <torch/types.h>

#include "mdd/data/training_data.h"
#include "mdd/diffusion/gaussian_diffusion.h"
#include "mdd/dist/process_group.h"
#include "mdd/export.h"
#include "mdd/minimax/memory_bank.h"
#include "mdd/models/dit.h"
#include "mdd/train/adamw.h"
#include "mdd/util/option_check.h"
#include "mdd/util/precision.h"
#include "mdd/util/progress.h"

namespace mdd {
namespace detail {
class OverlappedGradAverager;
}  // namespace detail

/// Options of the training loop. Defaults are the reference fine-tuning run (run.sh).
struct MDD_API FinetuneOptions {
  /// Optimiser steps in total (the reference uses the step-12000 checkpoint).
  TORCH_ARG(int64_t, steps) = 12000;
  /// Images per step (reference --global-batch-size 8).
  TORCH_ARG(int64_t, batch_size) = 8;
  /// AdamW learning rate (constant).
  TORCH_ARG(double, lr) = 1e-3;
  /// AdamW weight decay.
  TORCH_ARG(double, weight_decay) = 0.0;
  /// EMA decay applied after every step (the EMA starts as a copy of the initial model).
  TORCH_ARG(double, ema_decay) = 0.9999;
  /// Warm the EMA decay up as diffusers' EMAModel: step s (0-based) uses min(ema_decay,
  /// (1 + s) / (10 + s)), so the EMA of a short from-scratch run forgets its random start
  /// (the reference uses the constant decay: false).
  TORCH_ARG(bool, ema_warmup) = false;
  /// Linear learning-rate warm-up over this many steps (lr * (s + 1) / lr_warmup); 0 = constant
  /// lr as the reference.
  TORCH_ARG(int64_t, lr_warmup) = 0;
  /// Precision of the DiT's forward/backward (autocast). Master weights, AdamW state, EMA,
  /// diffusion losses and minimax terms stay float32. kFP16 (CUDA only) adds dynamic loss
  /// scaling. Not part of the resume signature: a run may continue in another precision.
  TORCH_ARG(Precision, precision) = Precision::kFP32;
  /// DiffFit: add gammas to the first `gamma_blocks` blocks (unless present) and train only
  /// biases, gammas and the class table. false: train every parameter except pos_embed.
  TORCH_ARG(bool, difffit) = true;
  /// Blocks that get DiffFit gammas.
  TORCH_ARG(int64_t, gamma_blocks) = 14;
  /// Add the minimax terms (reference --condense).
  TORCH_ARG(bool, minimax) = true;
  /// Weight of 1 − min cos to the real memory (--lambda-pos).
  TORCH_ARG(double, lambda_r) = 0.002;
  /// Weight of max cos to the generated memory (--lambda-neg).
  TORCH_ARG(double, lambda_d) = 0.008;
  /// Items per class in each memory (--memory-size).
  TORCH_ARG(int64_t, memory_size) = 64;
  /// Label-dropout probability during training (DiT: 0.1; the null class is the model's).
  TORCH_ARG(double, class_dropout_prob) = 0.1;
  /// The training process (create_diffusion(""): 1000 linear steps). Its respacing must stay ""
  /// (training draws from every step) and `learn_sigma` is taken from the model.
  TORCH_ARG(DiffusionOptions, diffusion) = DiffusionOptions();
  /// Seed of the data order and of every per-step draw.
  TORCH_ARG(uint64_t, seed) = 0;
  /// Write a checkpoint every this many steps (0 = only at the end) into `checkpoint_dir`.
  TORCH_ARG(int64_t, ckpt_every) = 0;
  /// Where checkpoints go ("" = no checkpoints).
  TORCH_ARG(std::string, checkpoint_dir) = "";
  /// Complete checkpoints kept (older ones deleted); 0 = keep all.
  TORCH_ARG(int64_t, keep_checkpoints) = 2;
  /// Steps between TrainStats reports (0 = never).
  TORCH_ARG(int64_t, log_every) = 100;
  /// Device the model is trained on (the data stays on the CPU and is moved per batch).
  TORCH_ARG(torch::Device, device) = torch::Device(torch::kCPU);
  /// Free-form JSON object stored in every checkpoint's sidecar (e.g. the resolved config).
  TORCH_ARG(std::string, config_json) = "{}";
  /// The processes that train together (data parallel; default: this process alone). Every rank
  /// must construct its trainer with the same options, model and data: the constructor checks
  /// the loop configuration, `config_json`, the model and the data size on all ranks and throws
  /// on every rank when one differs. `batch_size` must be a multiple of the world size.
  TORCH_ARG(dist::ProcessGroup, process_group) = dist::ProcessGroup();
  /// Gradients are averaged in buckets of at most this many bytes (one collective each; 0 = one
  /// bucket per dtype). Only used with more than one process.
  TORCH_ARG(int64_t, grad_bucket_bytes) = int64_t(25) << 20;
  /// Start each bucket's all-reduce during the backward, as soon as its gradients are there
  /// (DistributedDataParallel's overlap), instead of all buckets after it. Same averages either
  /// way; only the waiting shrinks. Only used with more than one process.
  TORCH_ARG(bool, overlap_grad_reduce) = true;

 public:
  /// Alias of `diffusion().num_timesteps()` (kept so existing code compiles).
  FinetuneOptions& diffusion_steps(int64_t steps) {
    diffusion_.num_timesteps(steps);
    return *this;
  }
  /// Alias of `diffusion().num_timesteps()`.
  int64_t diffusion_steps() const noexcept { return diffusion_.num_timesteps(); }
  /// Alias of `diffusion().noise_schedule()` (kept so existing code compiles).
  FinetuneOptions& noise_schedule(std::string schedule) {
    diffusion_.noise_schedule(std::move(schedule));
    return *this;
  }
  /// Alias of `diffusion().noise_schedule()`.
  const std::string& noise_schedule() const noexcept { return diffusion_.noise_schedule(); }
};

/// The rules `Finetuner` (and `Pretrainer`) apply to their options alone (sizes, rates, decays,
/// label dropout in [0, 1), no respacing); each broken one goes to `fail`. Rules that need the model
/// or the data (batch_size <= items, latent shape) are checked by the constructor.
MDD_API void check_options(const FinetuneOptions& o, const OptionFail& fail);

/// Losses of one step (host values).
struct MDD_API TrainStats {
  int64_t step = 0;             ///< steps completed
  int64_t total = 0;            ///< steps planned
  double loss = 0;              ///< total loss of the last step
  double diffusion = 0;         ///< mean(MSE + VB) of the last step
  double representativeness = 0;  ///< the unweighted R term of the last step (sum over classes / n)
  double diversity = 0;         ///< the unweighted D term of the last step
  double mean_loss = 0;         ///< mean total loss since the previous report
  double images_per_s = 0;      ///< throughput since the previous report
  double elapsed_s = 0;         ///< wall time since train() started
  double lr = 0;                ///< learning rate of the last step (after warm-up)
  double loss_scale = 1;        ///< fp16 loss scale after the last step (1 otherwise)
  bool skipped = false;         ///< fp16: the last step overflowed and was skipped
  /// Several processes: wall seconds spent in collectives (gradient mean, x̂0 gather) since the
  /// previous report (0 in a single process). Over `elapsed` of that window it is the
  /// communication share of a step.
  double communication_s = 0;
  /// Wall seconds of the window this report covers (since the previous report).
  double window_s = 0;
  /// Several processes with `overlap_grad_reduce`: gradient buckets of the last step whose
  /// all-reduce started during the backward, of `grad_buckets` in all (the rest started after it).
  int64_t overlapped_buckets = 0;
  int64_t grad_buckets = 0;
};
/// Receives TrainStats every `log_every` steps.
using TrainLogFn = std::function<void(const TrainStats&)>;

/// Every input of one step, as the loop draws them (for tests and debugging).
struct MDD_API StepInputs {
  LatentBatch batch;           ///< z0 and labels (CPU)
  torch::Tensor t;             ///< int64 [B]
  torch::Tensor noise;         ///< float32 [B, c, h, w]
  torch::Tensor model_labels;  ///< after label dropout, int64 [B]
};

/// The loss of one step and its parts (tensors on the training device; `loss` has grad).
struct MDD_API StepLoss {
  torch::Tensor loss, diffusion, representativeness, diversity, minimax, pred_xstart;
};

/// Fine-tunes (or pre-trains) a DiT. Owns the model's EMA copy, the optimizer and the memories.
class MDD_API Finetuner {
 public:
  /// Prepares `model` (moved to the device; DiffFit applied when requested and absent) and makes
  /// the EMA copy. Throws mdd::Error on inconsistent options or data (latent shape, labels).
  Finetuner(DiT model, std::shared_ptr<const TrainingData> data, FinetuneOptions options = {});

  /// Loads the newest readable checkpoint of `checkpoint_dir` (model, EMA, optimizer, memories,
  /// step). Returns false when there is none. Throws mdd::Error when the checkpoint does not fit
  /// this model (names the key) or was written with a different loop configuration.
  /// Temporary files of killed runs in `checkpoint_dir` are removed first; skipped checkpoints, the
  /// step fallen back to and "starting from step 0" are reported through `log`.
  bool resume(const LogFn& log = {});

  /// Runs until `steps` are done, writing checkpoints as configured (and one at the end).
  /// Progress stage "finetune" (or `stage`), one event per step. A NaN/Inf loss throws mdd::Error
  /// naming the step and the last good checkpoint; nothing is written for the bad step.
  void train(const ProgressFn& progress = {}, const TrainLogFn& log = {}, const std::string& stage = "finetune");

  /// One training step (no checkpointing). Returns its losses.
  TrainStats step();

  /// The inputs step `step` (0-based) draws; pure function of (seed, step, data).
  StepInputs inputs(int64_t step) const;
  /// The loss for `in` with the current weights and memories (no update, no push). With several
  /// processes this is collective (every rank calls it with the same global `in`): the network
  /// runs on this rank's rows only, `diffusion` is their mean, the minimax terms are those of the
  /// whole batch, `pred_xstart` is the whole batch's with minimax on (this rank's rows carry the
  /// graph; without minimax only this rank's rows) and
  /// `loss` = diffusion + W · minimax, whose gradients averaged over the ranks are the
  /// single-process gradients.
  StepLoss loss(const StepInputs& in);
  /// The rows [first, last) of the global batch this rank computes.
  std::pair<int64_t, int64_t> shard() const;

  /// Writes a checkpoint of the current state; returns it (requires `checkpoint_dir`).
  std::string save_checkpoint();

  /// Steps done so far.
  int64_t step_count() const { return step_; }
  DiT model() const { return model_; }
  /// The EMA model (use it for sampling).
  DiT ema() const { return ema_; }
  MemoryBank& real_memory() { return real_; }
  MemoryBank& generated_memory() { return generated_; }
  const GaussianDiffusion& diffusion() const { return diffusion_; }
  const FinetuneOptions& options() const { return options_; }
  AdamW& optimizer() { return *optimizer_; }
  /// The precision the forward/backward runs in (options().precision() resolved for the device).
  Precision precision() const { return precision_; }

 private:
  void check_finite(double loss, double diffusion, double minimax) const;
  void check_same_on_all_ranks() const;
  void average_gradients(torch::Tensor& stats);
  std::string write_own_checkpoint();
  bool resume_own(const LogFn& log);
  DiT model_, ema_;
  std::shared_ptr<const TrainingData> data_;
  FinetuneOptions options_;
  GaussianDiffusion diffusion_;
  MemoryBank real_, generated_;
  std::unique_ptr<AdamW> optimizer_;
  int64_t step_ = 0;
  Precision precision_ = Precision::kFP32;
  double loss_scale_ = 1.0;         // fp16 dynamic loss scale (GradScaler defaults)
  double comm_s_ = 0;               // seconds in collectives since the last report
  std::shared_ptr<detail::OverlappedGradAverager> averager_;  // set with several ranks and overlap
  int64_t overlapped_ = 0;          // buckets of the last step started during its backward
  int64_t good_steps_ = 0;          // fp16 steps since the scale last changed
  std::string last_checkpoint_;
  mutable torch::Tensor order_;       // batch order of epoch order_epoch_ (cache)
  mutable int64_t order_epoch_ = -1;
};

/// Options of `Pretrainer` (train a DiT from scratch; DiT train.py defaults where they fit).
MDD_API FinetuneOptions pretrain_defaults();

/// The same loop with every parameter trainable and no minimax terms, for domains without a
/// released class-conditional DiT. `options.difffit()`/`minimax()` must be false.
class MDD_API Pretrainer : public Finetuner {
 public:
  Pretrainer(DiT model, std::shared_ptr<const TrainingData> data, FinetuneOptions options = pretrain_defaults());
};

/// The per-step generator seed: splitmix64 mix of (seed, step).
MDD_API uint64_t step_seed(uint64_t seed, int64_t step);

}  // namespace mdd
