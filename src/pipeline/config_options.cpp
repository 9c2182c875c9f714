#include "pipeline/config_options.h"

namespace mdd::detail {

DiTOptions dit_options_of(const ModelConfig& m) {
  const bool custom = m.name == "custom";
  DiTOptions o = custom ? DiTOptions(m.input_size, m.patch_size, m.in_channels, m.hidden_size, m.depth, m.num_heads)
                        : dit_options(m.name, m.input_size, m.num_classes);
  o.num_classes(m.num_classes).class_dropout_prob(m.class_dropout_prob);
  if (custom) o.learn_sigma(true);
  return o;
}

FinetuneOptions pretrain_options_of(const DistillConfig& c) {
  const auto& p = c.pretrain;
  FinetuneOptions o = pretrain_defaults();
  o.steps(p.steps).batch_size(p.batch_size).lr(p.lr).ema_decay(p.ema_decay).seed(p.seed).ckpt_every(p.ckpt_every)
      .ema_warmup(p.ema_warmup).lr_warmup(p.lr_warmup).precision(parse_precision(p.precision))
      .class_dropout_prob(c.model.class_dropout_prob).log_every(100);
  return o;
}

FinetuneOptions finetune_options_of(const DistillConfig& c, bool minimax) {
  const auto& f = c.finetune;
  FinetuneOptions o;
  o.steps(f.steps).batch_size(f.batch_size).lr(f.lr).weight_decay(f.weight_decay).ema_decay(f.ema_decay)
      .gamma_blocks(f.gamma_blocks).minimax(minimax).lambda_r(f.lambda_r).lambda_d(f.lambda_d).memory_size(f.memory_size)
      .seed(f.seed).ckpt_every(f.ckpt_every).class_dropout_prob(c.model.class_dropout_prob).log_every(100)
      .precision(parse_precision(f.precision));
  return o;
}

VaeTrainerOptions vae_trainer_options_of(const VaeConfig& v) {
  VaeTrainerOptions o;
  o.steps(v.steps).batch_size(v.batch_size).lr(v.lr).lr_warmup(v.lr_warmup).kl_weight(v.kl_weight)
      .reconstruction(v.reconstruction).seed(v.seed).ckpt_every(v.ckpt_every).precision(parse_precision(v.precision))
      .log_every(100);
  return o;
}

AutoencoderKLOptions vae_architecture_of(const VaeConfig& v, int64_t image_channels, int64_t image_size) {
  return AutoencoderKLOptions().in_channels(image_channels).out_channels(image_channels)
      .latent_channels(v.latent_channels).block_out_channels(v.block_out_channels)
      .layers_per_block(v.layers_per_block).norm_num_groups(v.norm_num_groups).sample_size(image_size);
}

SamplerOptions sampler_options_of(const DistillConfig& c, bool learn_sigma, int64_t null_class) {
  const auto& s = c.sample;
  const SamplingMethod method = parse_sampling_method(s.method);
  // "50" with method ddim means 50 DDIM steps (the respacing string then needs its "ddim" prefix).
  const bool ddim_prefix = method == SamplingMethod::kDDIM && s.steps.rfind("ddim", 0) != 0;
  SamplerOptions o;
  o.batch_size(s.batch_size).timestep_respacing(ddim_prefix ? "ddim" + s.steps : s.steps).learn_sigma(learn_sigma)
      .cfg_scale(s.cfg_scale).null_class(null_class).guidance(parse_cfg_guidance(s.guidance.c_str()))
      .precision(parse_precision(s.precision)).method(method).eta(s.eta).cfg_interval(s.cfg_interval).seed(s.seed)
      .latent_shape({c.model.in_channels, c.model.input_size, c.model.input_size});
  return o;
}

EvalOptions eval_options_of(const DistillConfig& c, bool full_set) {
  const auto& e = c.evaluate;
  EvalOptions o;
  o.protocol(e.protocol).repeats(e.repeats).seed(e.seed).epochs(full_set ? e.full_set_epochs : e.epochs).device(c.device);
  if (e.image_size > 0) o.image_size(e.image_size);
  return o;
}

}  // namespace mdd::detail
