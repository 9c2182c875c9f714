#pragma once
/// \file
/// The distillation pipeline's configuration (one JSON file, `configs/*.json`).
///
/// Every section and key is optional; missing keys keep the defaults below (the reference's
/// values for the paper's ImageWoof run). Unknown keys, wrong types and invalid values are errors
/// that name the key, so a typo never silently falls back to a default.
#include <cstdint>
#include <string>
#include <vector>

#include "mdd/export.h"

namespace mdd {

/// `data.kind`: the Debian Fashion-MNIST package or an image folder tree.
enum class DataKind { kFashionMnist, kImageFolder };
/// `codec.kind`: pixel-space diffusion or an AutoencoderKL.
enum class CodecKind { kIdentity, kVae };
/// An entry of `evaluate.methods`: a set the pipeline builds and evaluates.
enum class DistillMethod { kRandom, kDit, kDifffit, kMinimax };

/// "fashion-mnist" / "imagefolder".
MDD_API const char* data_kind_name(DataKind k);
/// Inverse of `data_kind_name`; throws `mdd::Error` listing the valid names.
MDD_API DataKind parse_data_kind(const std::string& name);
/// "identity" / "vae".
MDD_API const char* codec_kind_name(CodecKind k);
/// Inverse of `codec_kind_name`; throws `mdd::Error` listing the valid names.
MDD_API CodecKind parse_codec_kind(const std::string& name);
/// "random" / "dit" / "difffit" / "minimax".
MDD_API const char* distill_method_name(DistillMethod m);
/// Inverse of `distill_method_name`; throws `mdd::Error` listing the valid names.
MDD_API DistillMethod parse_distill_method(const std::string& name);

/// Where the images come from.
struct MDD_API DataConfig {
  /// "fashion-mnist" (the Debian dataset package) or "imagefolder" (`root/<class>/<images>`).
  std::string kind = "imagefolder";
  /// fashion-mnist: the IDX directory; imagefolder: the training root (the ImageNet train dir).
  std::string root = "/usr/share/datasets/fashion-mnist";
  /// imagefolder: the test root with the same class folders (ImageNet val); "" = no test set.
  std::string test_root = "";
  /// imagefolder: the reference `--spec` ("woof", "nette", "idc"), sliced by nclass/phase.
  std::string spec = "woof";
  int64_t nclass = 10;
  int64_t phase = 0;
  /// Training crop size (ADM center_crop_arr) for imagefolder data.
  int64_t image_size = 256;
  /// Images per class used for fine-tuning (`--finetune-ipc`; -1 = all).
  int64_t finetune_ipc = -1;
  /// Decoding threads for image folders (0 = all cores).
  int64_t threads = 0;
};

/// The latent codec.
struct MDD_API CodecConfig {
  /// "identity" (pixel-space diffusion) or "vae" (AutoencoderKL, diffusers folder or file).
  std::string kind = "vae";
  /// VAE used to encode the training images (reference: sd-vae-ft-ema).
  std::string encoder = "";
  /// VAE used to decode samples (reference: sd-vae-ft-mse); "" = `encoder`.
  std::string decoder = "";
  /// Images per encoder/decoder call.
  int64_t batch_size = 16;
};

/// Training the codec from scratch: a small `AutoencoderKL` (`VaeTrainer`) for domains without a
/// released VAE (Fashion-MNIST). Used when `codec.kind` is "vae" and either `codec.encoder` is empty
/// or `--pretrain` is given with `vae.steps` > 0; the trained folder then replaces `codec.encoder`
/// and `codec.decoder`, and the DiT is pre-trained on its latents.
struct MDD_API VaeConfig {
  /// Optimiser steps; 0 = never train (the codec must be named by `codec.encoder`).
  int64_t steps = 0;
  int64_t batch_size = 64;
  double lr = 1e-3;
  int64_t lr_warmup = 100;
  /// Weight of the per-element KL term against the per-element reconstruction error.
  double kl_weight = 1e-4;
  /// "l1" or "mse".
  std::string reconstruction = "l1";
  /// Channels of each resolution level (downsampling 2^(levels-1)).
  std::vector<int64_t> block_out_channels = {16, 32, 32};
  int64_t latent_channels = 4;
  int64_t layers_per_block = 1;
  /// GroupNorm groups (must divide every channel count).
  int64_t norm_num_groups = 8;
  int64_t ckpt_every = 500;
  uint64_t seed = 0;
  /// "fp32", "bf16", "fp16" (CUDA) or "auto".
  std::string precision = "fp32";
  /// Decoder-only fine-tuning steps after the `steps` joint ones (`VaeTrainerOptions::train_encoder`
  /// false; same batch, rates and seed): sharper reconstructions, same latents and scaling factor.
  int64_t decoder_steps = 0;
};

/// The DiT.
struct MDD_API ModelConfig {
  /// A reference preset ("DiT-XL/2", ...) or "custom" (the shape fields below).
  std::string name = "DiT-XL/2";
  int64_t input_size = 32;
  int64_t patch_size = 2;
  int64_t in_channels = 4;
  int64_t hidden_size = 1152;
  int64_t depth = 28;
  int64_t num_heads = 16;
  int64_t num_classes = 1000;
  double class_dropout_prob = 0.1;
  /// Pre-trained weights (reference DiT-XL-2-256x256.pt, or an mdd checkpoint); "" = pretrain first.
  std::string checkpoint = "";
};

/// Pre-training from scratch (only when `model.checkpoint` is empty or `--pretrain` is given).
struct MDD_API PretrainConfig {
  int64_t steps = 10000;
  int64_t batch_size = 64;
  double lr = 1e-4;
  double ema_decay = 0.999;
  int64_t ckpt_every = 500;
  uint64_t seed = 0;
  /// Use the EMA weights as the result (DiT practice). false: the raw weights of the last step, for
  /// short runs whose EMA still averages a fast-moving model (see docs/fashion-mnist.md).
  bool use_ema = true;
  /// Warm the EMA decay up (min(ema_decay, (1+s)/(10+s)), diffusers' EMAModel).
  bool ema_warmup = false;
  /// Linear learning-rate warm-up steps (0 = constant lr).
  int64_t lr_warmup = 0;
  /// "fp32", "bf16", "fp16" (CUDA) or "auto" (bf16 where the hardware runs it fast).
  std::string precision = "fp32";
};

/// DiffFit (+ minimax) fine-tuning (reference run.sh).
struct MDD_API FinetuneConfig {
  int64_t steps = 12000;
  int64_t batch_size = 8;
  double lr = 1e-3;
  double weight_decay = 0.0;
  double ema_decay = 0.9999;
  int64_t gamma_blocks = 14;
  double lambda_r = 0.002;
  double lambda_d = 0.008;
  int64_t memory_size = 64;
  int64_t ckpt_every = 1000;
  uint64_t seed = 0;
  /// "fp32", "bf16", "fp16" (CUDA) or "auto".
  std::string precision = "fp32";
};

/// Sampling (reference sample.py, batched).
struct MDD_API SampleConfig {
  /// Images per class.
  int64_t ipc = 100;
  /// Respacing of the sampling process ("50" = 50 DDPM steps; "ddim50" for DDIM).
  std::string steps = "50";
  double cfg_scale = 4.0;
  /// Guidance interval [lo, hi] in training timesteps (`SamplerOptions::cfg_interval`); empty = every step.
  std::vector<int64_t> cfg_interval = {};
  /// DDIM stochasticity (`SamplerOptions::eta`; 0 = deterministic); ignored for DDPM.
  double eta = 0.0;
  /// "reference" (guide output channels 0..2, `model_out[:, :3]`) or "all" (every eps channel).
  std::string guidance = "reference";
  /// "ddpm" or "ddim".
  std::string method = "ddpm";
  int64_t batch_size = 16;
  uint64_t seed = 0;
  /// Which weights of a training checkpoint to sample from: "" (= "ema", as the reference), "ema", "model".
  std::string entry = "";
  /// "fp32", "bf16", "fp16" (CUDA) or "auto".
  std::string precision = "fp32";
  /// Generated candidates per kept image: > 1 samples `candidates * ipc` images per class and keeps
  /// `ipc` of them by `select` (1 = keep every sample, no selection). The first `ipc` candidates of
  /// a class are the images a run without candidates draws (same noise streams).
  int64_t candidates = 1;
  /// How the kept images are chosen among the candidates: "herding" (toward the mean embedding of
  /// the real images of the class), "kcenter" (spread over the candidates) or "random" (seeded).
  std::string select = "herding";
  /// herding / kcenter: epochs of the feature network (the `evaluate.protocol` network trained on
  /// the real training split, once per run) whose penultimate embedding the selection works in.
  int64_t select_epochs = 1;
  /// herding / kcenter: real training images per class the feature network trains on (seeded
  /// random, at most the smallest class's count; 0 = all images). The real class means are taken
  /// over all images either way. Training it is a solo job of rank 0 that sampling waits for.
  int64_t select_per_class = 0;
};

/// Evaluation of the distilled sets.
struct MDD_API EvaluateConfig {
  /// "idc" (the paper's ImageNet protocol) or "dc" (ConvNet-3, DC/DSA).
  std::string protocol = "idc";
  int64_t repeats = 3;
  /// Which sets to evaluate: "random" (real images), "dit" (pre-trained DiT, no fine-tuning),
  /// "difffit" (fine-tuned without minimax), "minimax" (ours).
  std::vector<std::string> methods = {"random", "minimax"};
  /// 0 = the protocol's epochs.
  int64_t epochs = 0;
  /// Also train on the whole training set (reduced epochs: `full_set_epochs`).
  bool full_set = false;
  int64_t full_set_epochs = 1;
  uint64_t seed = 0;
  /// Evaluation image size for image folders (0 = protocol: idc 224).
  int64_t image_size = 0;
};

/// The whole pipeline.
struct MDD_API DistillConfig {
  /// Run name (reports and logs).
  std::string name = "distill";
  /// Everything is written below this directory.
  std::string output_dir = "runs/distill";
  /// Torch device ("cpu", "cuda", "cuda:1").
  std::string device = "cpu";
  /// Torch intra-op threads (0 = LibTorch's default).
  int64_t threads = 0;
  DataConfig data;
  CodecConfig codec;
  VaeConfig vae;
  ModelConfig model;
  PretrainConfig pretrain;
  FinetuneConfig finetune;
  SampleConfig sample;
  EvaluateConfig evaluate;
};

/// Parses a config file. Throws mdd::Error naming the file and key on unknown keys, wrong types
/// and invalid values.
MDD_API DistillConfig load_config(const std::string& path);
/// Parses config text (`what` names the source in errors).
MDD_API DistillConfig parse_config(const std::string& json_text, const std::string& what = "<config>");
/// Applies one "section.key=value" override (value parsed as JSON, else taken as a string), with the
/// same checks as the file.
MDD_API void apply_override(DistillConfig& config, const std::string& assignment);
/// The fully resolved config as pretty JSON (every key, defaults included).
MDD_API std::string config_to_json(const DistillConfig& config);
/// Throws mdd::Error when values are inconsistent (e.g. unknown method, non-positive sizes).
MDD_API void validate_config(const DistillConfig& config);

}  // namespace mdd
