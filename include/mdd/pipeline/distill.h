#pragma once
/// \file
/// The distillation pipeline: (pre-train) → fine-tune → sample → evaluate → report, each stage
/// reusable on its own and resumable (finished stages are detected on disk and skipped, an
/// interrupted fine-tune resumes from its last checkpoint).
///
/// Layout under `config.output_dir`:
///   config.json                         the resolved config of the last run
///   vae/pretrained/, vae/checkpoints/   the codec, when the run trains it (`vae.steps` > 0)
///   cache/latents.safetensors           encoder posteriors of the training images (and mirrors)
///   cache/select_features.safetensors   the feature network of `sample.candidates` > 1 (herding/kcenter)
///   pretrain/ema.safetensors            pre-trained DiT (EMA) when the pipeline pre-trains
///   <variant>/checkpoints/, <variant>/ema.safetensors   fine-tuning ("difffit", "minimax")
///   samples/<class>/<k>.png             the distilled set (minimax); samples-<method>/ for others
///   <samples dir>/samples.safetensors   latents, labels and images of that set
///   eval/<method>.json                  evaluation results (reused when the inputs are unchanged)
///   report.json, report.md, contact_sheet.png
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "mdd/data/labeled_images.h"
#include "mdd/data/training_data.h"
#include "mdd/dist/process_group.h"
#include "mdd/eval/evaluator.h"
#include "mdd/export.h"
#include "mdd/models/codec.h"
#include "mdd/models/dit.h"
#include "mdd/pipeline/config.h"
#include "mdd/train/finetune.h"
#include "mdd/util/progress.h"

namespace mdd {

/// Callbacks of a pipeline run (all optional). The library never prints; examples render these.
struct MDD_API PipelineCallbacks {
  /// Progress of long stages ("load_images", "encode_latents", "pretrain", "finetune-minimax",
  /// "sample-minimax", "evaluate-random", ...).
  ProgressFn progress;
  /// Loss reports of training stages.
  TrainLogFn train_log;
  /// One human-readable line per notable event (stage start/skip/finish, files written).
  std::function<void(const std::string&)> log;
};

/// The real data of a run.
struct MDD_API PipelineData {
  /// Training images (uint8 [N, H, W, C]) with local labels and class names.
  LabeledImages train;
  /// Test images (empty tensors when the config has no test set).
  LabeledImages test;
  /// Folder name of each class in sample outputs (synsets for ImageNet, sanitised names otherwise).
  std::vector<std::string> class_dirs;
  /// The label the DiT is conditioned on for each local class.
  std::vector<int64_t> model_labels;
};

/// Loads the training (and test) images the config names.
MDD_API PipelineData load_pipeline_data(const DistillConfig& config, const PipelineCallbacks& callbacks = {});

/// A freshly initialised DiT of the configured architecture (seeded with `seed`).
MDD_API DiT make_model(const ModelConfig& config, uint64_t seed = 0);
/// A DiT of the configured architecture with weights from `path` (any format load_model_weights
/// reads; DiffFit gammas are added when the file has them). Loaded strictly: every key must match.
MDD_API DiT load_model(const ModelConfig& config, const std::string& path, const std::string& entry = "");
/// The codec for encoding ("encoder") or decoding ("decoder") under the config.
MDD_API std::shared_ptr<Codec> make_codec(const CodecConfig& config, const std::string& role, const std::string& device);

/// Latent training data (cached posteriors of the training images, `finetune_ipc` subset).
/// With a `group` of several ranks rank 0 encodes the cache file and the others then read it.
MDD_API std::shared_ptr<LatentTrainingData> make_training_data(const DistillConfig& config, const PipelineData& data,
                                                               const PipelineCallbacks& callbacks = {},
                                                               const dist::ProcessGroup& group = dist::ProcessGroup());

/// Trains the codec from scratch under `config.vae` (a small AutoencoderKL, `VaeTrainer`, resuming
/// `<output_dir>/vae/checkpoints`) and writes it as a diffusers folder `<output_dir>/vae/pretrained`
/// (scaling factor fitted to the training images); returns that folder, usable as `codec.encoder`.
/// Reuses the folder when it was written with the same settings. Throws mdd::Error unless
/// `codec.kind` is "vae" and `vae.steps` > 0.
/// With a `group` of several ranks rank 0 trains and the others wait for its folder.
MDD_API std::string train_vae(const DistillConfig& config, const PipelineData& data, const PipelineCallbacks& callbacks = {},
                              const dist::ProcessGroup& group = dist::ProcessGroup());

/// Pre-trains a DiT from scratch (resuming `pretrain/checkpoints` when present) and writes its EMA
/// weights to `<output_dir>/pretrain/ema.safetensors` (raw weights to `pretrain/model.safetensors`
/// with `pretrain.use_ema` = false); returns that path. Skips the work when the
/// file exists and `force` is false.
/// With a `group` of several ranks the training is data parallel (`FinetuneOptions::process_group`)
/// and rank 0 writes the files.
MDD_API std::string run_pretrain(const DistillConfig& config, const PipelineData& data, bool force = false,
                                 const PipelineCallbacks& callbacks = {}, const dist::ProcessGroup& group = dist::ProcessGroup());

/// Fine-tunes the weights at `init_weights` with DiffFit, with (`variant` "minimax") or without
/// ("difffit") the minimax terms; resumes `<output_dir>/<variant>/checkpoints`; writes and returns
/// `<output_dir>/<variant>/ema.safetensors` (skipped when it exists for the same settings).
/// Data parallel with a `group` of several ranks, as run_pretrain.
MDD_API std::string run_finetune(const DistillConfig& config, const PipelineData& data, const std::string& init_weights,
                                 const std::string& variant, const PipelineCallbacks& callbacks = {},
                                 const dist::ProcessGroup& group = dist::ProcessGroup());

/// Samples `sample.ipc` images per class from `weights` (EMA) into `out_dir` (`<class>/<k>.png`,
/// samples.safetensors, sample_config.json, grid.png = up to 20 per class) and returns them as a labelled set. Reuses an existing
/// samples.safetensors written with the same weights and settings.
/// With `sample.candidates` K > 1 it generates K x ipc images per class and keeps ipc of them by
/// `sample.select` (herding toward the real class means in the embedding of a network trained on
/// `data.train`, cached in `<output_dir>/cache`); sample_config.json lists the kept stream ids.
/// With a `group` of several ranks the batches are shared (bit-identical to one process), every
/// rank returns the whole set and rank 0 writes the files.
MDD_API LabeledImages run_sample(const DistillConfig& config, const PipelineData& data, const std::string& weights,
                                 const std::string& out_dir, const std::string& stage = "sample",
                                 const PipelineCallbacks& callbacks = {},
                                 const dist::ProcessGroup& group = dist::ProcessGroup());

/// Evaluates a training set on the test set under `config.evaluate` (protocol, repeats, seed),
/// caching the result in `<output_dir>/eval/<name>.json`.
/// With a `group` of several ranks the repeats are shared (`Evaluator::run` with a group).
MDD_API EvalResult run_evaluate(const DistillConfig& config, const LabeledImages& train, const LabeledImages& test,
                                const std::string& name, const PipelineCallbacks& callbacks = {},
                                const dist::ProcessGroup& group = dist::ProcessGroup());

/// What `run_distill` does beyond the config.
struct MDD_API DistillRunOptions {
  /// Pre-train from scratch even when `model.checkpoint` is set; with `vae.steps` > 0 the codec
  /// is trained too (`train_vae`) instead of loading `codec.encoder`.
  bool force_pretrain = false;
  /// Stop after sampling (no evaluation, no report table).
  bool skip_evaluate = false;
  /// The processes running this pipeline together (default: this one alone). Every rank calls
  /// run_distill with the same config (checked at start); training is data parallel, sampling and
  /// evaluation repeats are shared, rank 0 writes every file and the others wait for it where
  /// it works alone (encoding the latents, training the codec). See docs/distributed.md.
  dist::ProcessGroup process_group;
};

/// The whole pipeline. Writes report.json (`results.<method>.{mean,std,runs}`, `ipc`, `protocol`,
/// `timings_s`, ...), report.md and contact_sheet.png; returns the path of report.json.
MDD_API std::string run_distill(const DistillConfig& config, const DistillRunOptions& options = {},
                                const PipelineCallbacks& callbacks = {});

/// A class name made safe as a folder name ("T-shirt/top" -> "T-shirt_top").
MDD_API std::string sanitize_class_dir(const std::string& name);

}  // namespace mdd
