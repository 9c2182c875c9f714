#pragma once
// Internal (not installed): each config section converted to the options of the library component it
// configures. The pipeline builds its components from these, and `validate_config` runs the
// components' own `check_options` on them, so a config is judged by the same rules as the code that
// will run it (the error names the config key).
#include <cstdint>

#include "mdd/diffusion/sampler.h"
#include "mdd/eval/evaluator.h"
#include "mdd/models/autoencoder_kl.h"
#include "mdd/models/dit.h"
#include "mdd/pipeline/config.h"
#include "mdd/train/finetune.h"
#include "mdd/train/vae_trainer.h"

namespace mdd::detail {

/// `model`: a preset ("DiT-XL/2", ...) resized to input_size/num_classes, or the "custom" shape.
DiTOptions dit_options_of(const ModelConfig& m);
/// `pretrain` (+ model.class_dropout_prob): everything but run-specific paths, device and config_json.
FinetuneOptions pretrain_options_of(const DistillConfig& c);
/// `finetune` (+ model.class_dropout_prob): DiffFit, with the minimax criteria when `minimax`.
FinetuneOptions finetune_options_of(const DistillConfig& c, bool minimax);
/// `vae`: the trainer's options (no checkpoint_dir, device).
VaeTrainerOptions vae_trainer_options_of(const VaeConfig& v);
/// `vae`: the architecture for images with `image_channels` channels of `image_size` pixels.
AutoencoderKLOptions vae_architecture_of(const VaeConfig& v, int64_t image_channels, int64_t image_size);
/// `sample` for a DiT of the configured shape: `learn_sigma` and `null_class` come from that model.
SamplerOptions sampler_options_of(const DistillConfig& c, bool learn_sigma, int64_t null_class);
/// `evaluate` (+ device); `full_set` uses `full_set_epochs`.
EvalOptions eval_options_of(const DistillConfig& c, bool full_set);

}  // namespace mdd::detail
