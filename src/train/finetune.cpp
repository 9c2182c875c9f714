#include "mdd/train/finetune.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "mdd/io/state_dict.h"
#include "mdd/io/weight_entry.h"
#include "mdd/minimax/minimax_loss.h"
#include "mdd/models/difffit.h"
#include "mdd/train/checkpoint.h"
#include "mdd/train/ema.h"
#include "mdd/util/error.h"
#include "train/data_parallel.h"
#include "util/splitmix.h"
#include "util/json_preview.h"

namespace mdd {
namespace {

int64_t count_gamma_blocks(const DiT& model) {
  int64_t n = 0;
  for (int64_t i = 0; i < model->options().depth(); ++i)
    if (model->block(i)->has_gammas()) ++n;
  return n;
}

// The parts of the loop configuration a resumed run must share with the run that wrote the
// checkpoint (everything that changes what a step computes). `steps` may grow.
nlohmann::json loop_signature(const FinetuneOptions& o) {
  nlohmann::json j = {{"batch_size", o.batch_size()},       {"lr", o.lr()},
          {"weight_decay", o.weight_decay()},   {"ema_decay", o.ema_decay()},
          {"difffit", o.difffit()},             {"gamma_blocks", o.gamma_blocks()},
          {"minimax", o.minimax()},             {"lambda_r", o.lambda_r()},
          {"lambda_d", o.lambda_d()},           {"memory_size", o.memory_size()},
          {"class_dropout_prob", o.class_dropout_prob()}, {"diffusion_steps", o.diffusion_steps()},
          {"noise_schedule", o.noise_schedule()}, {"seed", std::to_string(o.seed())}};
  // Later additions enter the signature only when they differ from the old behaviour, so the
  // checkpoints of earlier runs keep resuming.
  if (o.ema_warmup()) j["ema_warmup"] = true;
  if (o.lr_warmup() > 0) j["lr_warmup"] = o.lr_warmup();
  return j;
}



}  // namespace

uint64_t step_seed(uint64_t seed, int64_t step) { return splitmix64(seed ^ splitmix64(0xF17E7u + uint64_t(step))); }

FinetuneOptions pretrain_defaults() {
  FinetuneOptions o;
  // DiT train.py: AdamW lr 1e-4, wd 0, every parameter trainable, no minimax. The EMA decay is
  // lowered from 0.9999 because from-scratch runs here are thousands, not millions, of steps.
  o.lr(1e-4).difffit(false).minimax(false).ema_decay(0.999).batch_size(64).steps(10000);
  return o;
}

void check_options(const FinetuneOptions& o, const OptionFail& fail) {
  if (o.steps() < 0) fail("steps", fmt::format("must be >= 0, got {}", o.steps()));
  for (auto [name, v] : {std::pair<const char*, int64_t>{"batch_size", o.batch_size()}, {"memory_size", o.memory_size()}})
    if (v <= 0) fail(name, fmt::format("must be > 0, got {}", v));
  for (auto [name, v] : {std::pair<const char*, int64_t>{"ckpt_every", o.ckpt_every()}, {"log_every", o.log_every()},
                         {"lr_warmup", o.lr_warmup()}, {"gamma_blocks", o.gamma_blocks()},
                         {"keep_checkpoints", o.keep_checkpoints()}})
    if (v < 0) fail(name, fmt::format("must be >= 0, got {}", v));
  if (!(o.lr() > 0) || !std::isfinite(o.lr())) fail("lr", fmt::format("must be finite and > 0, got {}", o.lr()));
  for (auto [name, v] : {std::pair<const char*, double>{"weight_decay", o.weight_decay()}, {"lambda_r", o.lambda_r()},
                         {"lambda_d", o.lambda_d()}})
    if (!(v >= 0) || !std::isfinite(v)) fail(name, fmt::format("must be finite and >= 0, got {}", v));
  if (!(o.ema_decay() >= 0 && o.ema_decay() <= 1)) fail("ema_decay", fmt::format("must lie in [0, 1], got {}", o.ema_decay()));
  // The same rule as the DiT's own label dropout ([0, 1)): fine-tuning needs the class labels.
  if (!(o.class_dropout_prob() >= 0 && o.class_dropout_prob() < 1))
    fail("class_dropout_prob", fmt::format("must lie in [0, 1), got {}", o.class_dropout_prob()));
  if (!o.diffusion().timestep_respacing().empty())
    fail("diffusion", "timestep_respacing must be \"\" (training draws from every step), got \"" +
                          o.diffusion().timestep_respacing() + "\"");
}

Finetuner::Finetuner(DiT model, std::shared_ptr<const TrainingData> data, FinetuneOptions options)
    : model_(std::move(model)),
      ema_(nullptr),
      data_(std::move(data)),
      options_(std::move(options)),
      diffusion_(DiffusionOptions(options_.diffusion()).learn_sigma(model_ ? model_->options().learn_sigma() : true)),
      real_(data_ ? data_->num_classes() : 1, std::max<int64_t>(options_.memory_size(), 1)),
      generated_(data_ ? data_->num_classes() : 1, std::max<int64_t>(options_.memory_size(), 1)) {
  if (!model_) throw Error("Finetuner: model is empty");
  if (!data_) throw Error("Finetuner: no training data");
  const auto& mo = model_->options();
  const auto& o = options_;
  check_options(o, throw_option_error("Finetuner"));
  if (o.class_dropout_prob() > 0 && mo.class_dropout_prob() <= 0)
    throw Error("Finetuner: label dropout requested but the model has no null-class row (class_dropout_prob = 0)");
  precision_ = resolve_precision(o.precision(), o.device());
  if (precision_ == Precision::kFP16) loss_scale_ = 65536.0;
  if (data_->size() < o.batch_size())
    throw Error(fmt::format("Finetuner: batch_size {} exceeds the {} training items", o.batch_size(), data_->size()));
  const std::vector<int64_t> want{mo.in_channels(), mo.input_size(), mo.input_size()};
  if (data_->latent_shape() != want)
    throw Error(fmt::format("Finetuner: training latents have shape {} but the model expects [{}, {}, {}]",
                            c10::str(c10::IntArrayRef(data_->latent_shape())), want[0], want[1], want[2]));
  if (!nlohmann::json::accept(o.config_json())) throw Error("Finetuner: config_json is not valid JSON");

  model_->to(o.device());
  if (o.difffit()) {
    if (!has_difffit(model_)) {
      apply_difffit(model_, DiffFitOptions().gamma_blocks(o.gamma_blocks()));
    } else {
      for (auto& p : model_->named_parameters()) p.value().set_requires_grad(is_difffit_trainable(p.key()));
    }
  } else {
    for (auto& p : model_->named_parameters()) p.value().set_requires_grad(p.key() != "pos_embed");
  }
  // Label dropout is drawn explicitly from the step generator, so the module itself never drops.
  model_->eval();

  if (o.process_group().world_size() > 1) {
    detail::check_batch_divides("Finetuner", o.batch_size(), o.process_group());
    check_same_on_all_ranks();
    detail::broadcast_from_main(o.process_group(), *model_);
  }

  // EMA = an exact copy made before training (train_dit.py:176, deepcopy then update_ema(decay=0)):
  // clone() keeps the DiffFit structure, device and dtype of the model.
  ema_ = DiT(std::dynamic_pointer_cast<DiTImpl>(model_->clone()));
  for (auto& p : ema_->parameters()) p.set_requires_grad(false);
  ema_->eval();

  auto params = trainable_parameters(*model_);
  if (params.empty()) throw Error("Finetuner: the model has no trainable parameters");
  optimizer_ = std::make_unique<AdamW>(params, AdamWOptions().lr(o.lr()).weight_decay(o.weight_decay()));
  if (o.process_group().world_size() > 1 && o.overlap_grad_reduce())
    averager_ = std::make_shared<detail::OverlappedGradAverager>(o.process_group(), optimizer_->params(),
                                                                 o.grad_bucket_bytes());
}

StepInputs Finetuner::inputs(int64_t step) const {
  if (step < 0) throw Error("Finetuner::inputs: negative step");
  const int64_t b = options_.batch_size();
  const int64_t per_epoch = data_->size() / b;  // drop_last, as the reference's DataLoader
  const int64_t epoch = step / per_epoch, k = step % per_epoch;
  // The permutation is drawn once per epoch, not once per step (it costs O(dataset)).
  if (epoch != order_epoch_) {
    order_ = epoch_order(data_->size(), options_.seed(), epoch);
    order_epoch_ = epoch;
  }
  const torch::Tensor& order = order_;
  StepInputs in;
  auto gen = at::detail::createCPUGenerator(step_seed(options_.seed(), step));
  in.batch = data_->batch(order.slice(0, k * b, (k + 1) * b).contiguous(), gen);
  in.t = torch::randint(0, options_.diffusion_steps(), {b}, gen, torch::kInt64);
  in.noise = torch::randn(in.batch.latents.sizes(), gen, torch::kFloat32);
  in.model_labels = in.batch.model_labels.clone();
  if (options_.class_dropout_prob() > 0) {
    const torch::Tensor drop = torch::rand({b}, gen) < options_.class_dropout_prob();
    in.model_labels = model_->y_embedder->drop_labels(in.model_labels, drop);
  }
  return in;
}

std::pair<int64_t, int64_t> Finetuner::shard() const {
  return detail::batch_shard(options_.batch_size(), options_.process_group());
}

StepLoss Finetuner::loss(const StepInputs& in) {
  const auto dev = options_.device();
  auto& pg = options_.process_group();
  const int64_t world = pg.world_size();
  const int64_t b = in.t.size(0);
  if (world > 1 && b != options_.batch_size())
    throw Error(fmt::format("Finetuner::loss: with {} processes the inputs must be a whole global batch of {}, got {}",
                            world, options_.batch_size(), b));
  // This rank's rows (all of them in a single process).
  const auto [lo, hi] = world > 1 ? shard() : std::pair<int64_t, int64_t>{0, b};
  auto rows = [lo = lo, hi = hi, &dev](const torch::Tensor& x) { return x.slice(0, lo, hi).to(dev); };
  const torch::Tensor x0 = rows(in.batch.latents);
  const torch::Tensor t = rows(in.t);
  const torch::Tensor noise = rows(in.noise);
  const torch::Tensor y = rows(in.model_labels);
  DiT m = model_;
  const Precision prec = precision_;
  ModelFn fn = [m, y, dev, prec](const torch::Tensor& x, const torch::Tensor& tt) mutable {
    // Only the network runs under autocast; its output returns to float32 so that the diffusion
    // losses, x̂0 and the minimax terms are computed exactly as in an fp32 run.
    AutocastGuard autocast(dev, prec);
    return m->forward(x, tt, y).to(torch::kFloat32);
  };
  TrainingLosses tl = diffusion_.training_losses(fn, x0, t, noise);
  StepLoss out;
  out.diffusion = tl.loss.mean();
  out.pred_xstart = tl.pred_xstart;
  if (world > 1 && options_.minimax()) {
    // The whole batch's x̂0: the other ranks' rows as values, this rank's rows live, so that the
    // minimax terms (which compare the items of a class across the batch) are the single-process
    // ones and their gradient reaches this rank's rows.
    const auto c0 = std::chrono::steady_clock::now();
    const torch::Tensor all = pg.all_gather(tl.pred_xstart.detach().contiguous()).to(dev);
    comm_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - c0).count();
    out.pred_xstart = torch::cat({all.slice(0, 0, lo), tl.pred_xstart, all.slice(0, hi, b)});
  }
  if (options_.minimax()) {
    MinimaxTerms terms = minimax_loss(out.pred_xstart, in.batch.labels.to(dev), real_, generated_,
                                      MinimaxLossOptions().lambda_r(options_.lambda_r()).lambda_d(options_.lambda_d()).check_finite(false));
    out.representativeness = terms.representativeness;
    out.diversity = terms.diversity;
    out.minimax = terms.total;
    // × world: the gradients are averaged over the ranks, and each rank's share of the minimax
    // gradient flows only through its own rows.
    out.loss = world > 1 ? out.diffusion + terms.total * double(world) : out.diffusion + terms.total;
  } else {
    out.representativeness = torch::zeros({}, out.diffusion.options());
    out.diversity = torch::zeros({}, out.diffusion.options());
    out.minimax = torch::zeros({}, out.diffusion.options());
    out.loss = out.diffusion;
  }
  return out;
}

void Finetuner::check_finite(double v, double diffusion, double minimax) const {
  if (std::isfinite(v)) return;
  throw Error(fmt::format(
      "training diverged: loss is {} at step {} (diffusion {}, minimax {}); {}. Nothing was written for this step; "
      "lower the learning rate or check the data.",
      v, step_ + 1, diffusion, minimax,
      last_checkpoint_.empty() ? std::string("no checkpoint was written yet")
                               : "the last good checkpoint is " + last_checkpoint_));
}

TrainStats Finetuner::step() {
  StepInputs in = inputs(step_);
  const double lr = options_.lr_warmup() > 0
                        ? options_.lr() * std::min(1.0, double(step_ + 1) / double(options_.lr_warmup()))
                        : options_.lr();
  optimizer_->set_lr(lr);
  optimizer_->zero_grad();
  StepLoss l = loss(in);
  const bool parallel = options_.process_group().world_size() > 1;
  // [diffusion, minimax] of the step as the whole batch sees them (diffusion averaged over ranks).
  torch::Tensor stats = torch::stack({l.diffusion.detach(), l.minimax.detach()}).to(torch::kCPU, torch::kFloat64);
  if (!parallel) {
    const double d = stats[0].item<double>(), m = stats[1].item<double>();
    check_finite(d + m, d, m);
  }
  bool skipped = false;
  if (precision_ == Precision::kFP16) {
    // Dynamic loss scaling (torch.cuda.amp.GradScaler defaults: 2^16, x0.5 on overflow, x2 after
    // 2000 clean steps): fp16 gradients of small losses would underflow without it.
    if (averager_) averager_->arm();
    (l.loss * loss_scale_).backward();
    if (parallel) average_gradients(stats);
    bool finite = true;
    {
      // Unscale on the device and accumulate "all finite" there too: one host sync per step, not
      // one per parameter (each .item() on CUDA waits for the queue to drain).
      torch::NoGradGuard ng;
      torch::Tensor all_finite;
      for (auto& p : optimizer_->params())
        if (p.grad().defined()) {
          p.mutable_grad().div_(loss_scale_);
          auto f = torch::isfinite(p.grad()).all();
          all_finite = all_finite.defined() ? all_finite.logical_and(f) : f;
        }
      if (all_finite.defined()) finite = all_finite.item<bool>();
    }
    if (finite) {
      optimizer_->step();
      if (++good_steps_ >= 2000) {
        loss_scale_ *= 2.0;
        good_steps_ = 0;
      }
    } else {
      loss_scale_ *= 0.5;
      good_steps_ = 0;
      skipped = true;
    }
  } else {
    if (averager_) averager_->arm();
    l.loss.backward();
    if (parallel) average_gradients(stats);
    optimizer_->step();
  }
  const double decay = options_.ema_warmup() ? std::min(options_.ema_decay(), (1.0 + double(step_)) / (10.0 + double(step_)))
                                             : options_.ema_decay();
  update_ema(*ema_, *model_, decay);
  if (options_.minimax()) {
    // After the loss (train_dit.py:270-276): the batch is never compared with itself.
    // With several processes `in` and `pred_xstart` are the whole batch: every rank's memories
    // receive what a single process's would.
    const torch::Tensor labels = in.batch.labels.to(options_.device());
    real_.push(in.batch.latents.to(options_.device()), labels);
    generated_.push(l.pred_xstart.detach(), labels);
  }
  ++step_;
  TrainStats s;
  s.step = step_;
  s.total = options_.steps();
  s.diffusion = stats[0].item<double>();
  s.loss = s.diffusion + stats[1].item<double>();
  s.representativeness = l.representativeness.item<double>();
  s.diversity = l.diversity.item<double>();
  s.lr = lr;
  s.loss_scale = loss_scale_;
  s.skipped = skipped;
  if (averager_) {
    s.overlapped_buckets = overlapped_;
    s.grad_buckets = int64_t(averager_->buckets());
  }
  return s;
}

void Finetuner::average_gradients(torch::Tensor& stats) {
  auto& pg = options_.process_group();
  const auto c0 = std::chrono::steady_clock::now();
  if (averager_)
    overlapped_ = int64_t(averager_->finish());  // most buckets were reduced during the backward
  else
    detail::average_gradients(pg, optimizer_->params(), options_.grad_bucket_bytes());
  // The loss parts: the diffusion mean over ranks; the minimax terms are already the whole
  // batch's on every rank, so their mean is unchanged.
  std::vector<torch::Tensor> st{stats};
  pg.all_reduce_mean(st);
  comm_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - c0).count();
  // Checked after the collective so that every rank sees the same value and stops together (a
  // rank that threw alone would leave the others waiting in the next collective).
  const double d = stats[0].item<double>(), m = stats[1].item<double>();
  check_finite(d + m, d, m);
}

void Finetuner::check_same_on_all_ranks() const {
  const auto& mo = model_->options();
  nlohmann::json j = {{"loop", loop_signature(options_)},
                      {"steps", options_.steps()},
                      {"precision", precision_name(precision_)},
                      {"checkpoint_dir", options_.checkpoint_dir()},
                      {"ckpt_every", options_.ckpt_every()},
                      {"grad_reduce", {options_.grad_bucket_bytes(), options_.overlap_grad_reduce()}},
                      {"config", nlohmann::json::parse(options_.config_json())},
                      {"model", {mo.input_size(), mo.patch_size(), mo.in_channels(), mo.hidden_size(), mo.depth(),
                                 mo.num_heads(), mo.num_classes(), mo.learn_sigma()}},
                      {"data", {{"size", data_->size()}, {"classes", data_->num_classes()},
                                {"labels_sum", data_->labels().sum().item<int64_t>()}}}};
  dist::ProcessGroup pg = options_.process_group();  // a handle: copies share the group
  pg.check_same("training configuration (options, model shape, data)", j.dump());
}

std::string Finetuner::save_checkpoint() {
  if (options_.checkpoint_dir().empty()) throw Error("Finetuner::save_checkpoint: no checkpoint_dir set");
  last_checkpoint_ = detail::write_checkpoint_on_main(options_.process_group(), [&] { return write_own_checkpoint(); },
                                                      options_.checkpoint_dir(), step_);
  return last_checkpoint_;
}

std::string Finetuner::write_own_checkpoint() {
  io::TensorMap t = with_prefix(state_dict(*model_), std::string(io::kModelEntry) + ".");
  for (auto& kv : with_prefix(state_dict(*ema_), std::string(io::kEmaEntry) + ".")) t.emplace(kv);
  for (auto& kv : optimizer_->state("opt.")) t.emplace(kv);
  if (options_.minimax()) {
    for (auto& kv : real_.state("bank.real.")) t.emplace(kv);
    for (auto& kv : generated_.state("bank.generated.")) t.emplace(kv);
  }
  nlohmann::json meta;
  meta["format"] = "mdd-train-checkpoint";
  meta["loop"] = loop_signature(options_);
  meta["steps_planned"] = options_.steps();
  meta["precision"] = precision_name(precision_);
  if (precision_ == Precision::kFP16) meta["amp"] = {{"loss_scale", loss_scale_}, {"good_steps", good_steps_}};
  meta["config"] = nlohmann::json::parse(options_.config_json());
  meta["seeds"] = {{"seed", std::to_string(options_.seed())},
                   {"rule", "step s draws from a CPU generator seeded splitmix(seed, s); epoch e order from (seed, e)"}};
  // Informational: a checkpoint does not depend on the world size and resumes with any.
  meta["world_size"] = options_.process_group().world_size();
  meta["model"] = {{"input_size", model_->options().input_size()},   {"patch_size", model_->options().patch_size()},
                   {"in_channels", model_->options().in_channels()}, {"hidden_size", model_->options().hidden_size()},
                   {"depth", model_->options().depth()},             {"num_heads", model_->options().num_heads()},
                   {"num_classes", model_->options().num_classes()}, {"gamma_blocks", count_gamma_blocks(model_)}};
  auto info = write_checkpoint(options_.checkpoint_dir(), step_, t, meta.dump(), options_.keep_checkpoints());
  last_checkpoint_ = info.weights_path;
  return info.weights_path;
}

bool Finetuner::resume(const LogFn& log) {
  if (options_.checkpoint_dir().empty()) return false;
  return detail::resume_in_order(options_.process_group(), [&](bool main) { return resume_own(main ? log : LogFn()); },
                                 [&] { return step_; });
}

bool Finetuner::resume_own(const LogFn& log) {
  auto ck = open_checkpoint_for_resume(options_.checkpoint_dir(), log);
  if (!ck) return false;
  nlohmann::json meta = nlohmann::json::parse(ck->meta_json);
  const nlohmann::json want = loop_signature(options_);
  if (!meta.contains("loop") || !meta["loop"].is_object())
    throw Error(ck->info.meta_path + ": not an mdd training checkpoint (no 'loop' object)");
  for (auto it = want.begin(); it != want.end(); ++it) {
    if (!meta["loop"].contains(it.key()) || meta["loop"][it.key()] != it.value())
      throw Error(fmt::format("{}: cannot resume: '{}' was {} in the checkpointed run and is {} now", ck->info.meta_path,
                              it.key(), detail::json_preview(meta["loop"].value(it.key(), nlohmann::json())), detail::json_preview(it.value())));
  }
  load_state_dict(*model_, strip_prefix(ck->tensors, std::string(io::kModelEntry) + "."), /*strict=*/true);
  load_state_dict(*ema_, strip_prefix(ck->tensors, std::string(io::kEmaEntry) + "."), /*strict=*/true);
  optimizer_->load_state(ck->tensors, "opt.");
  if (options_.minimax()) {
    real_.load_state(ck->tensors, "bank.real.");
    generated_.load_state(ck->tensors, "bank.generated.");
  }
  if (precision_ == Precision::kFP16 && meta.contains("amp") && meta["amp"].is_object()) {
    const auto& amp = meta["amp"];
    if (!amp.value("loss_scale", nlohmann::json()).is_number() || !amp.value("good_steps", nlohmann::json()).is_number_integer())
      throw Error(ck->info.meta_path + ": 'amp' must hold a numeric loss_scale and an integer good_steps");
    loss_scale_ = amp["loss_scale"].get<double>();
    good_steps_ = amp["good_steps"].get<int64_t>();
  }
  step_ = ck->info.step;
  last_checkpoint_ = ck->info.weights_path;
  return true;
}

void Finetuner::train(const ProgressFn& progress, const TrainLogFn& log, const std::string& stage) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  auto since = [](clock::time_point a) { return std::chrono::duration<double>(clock::now() - a).count(); };
  double loss_sum = 0;
  int64_t loss_n = 0;
  auto window_start = clock::now();
  int64_t window_steps = 0;
  if (progress) progress({stage, step_, options_.steps(), 0.0});
  while (step_ < options_.steps()) {
    TrainStats s = step();
    loss_sum += s.loss;
    ++loss_n;
    ++window_steps;
    if (progress) progress({stage, step_, options_.steps(), since(t0)});
    const bool last = step_ == options_.steps();
    if (log && options_.log_every() > 0 && (step_ % options_.log_every() == 0 || last)) {
      s.mean_loss = loss_sum / double(loss_n);
      const double w = since(window_start);
      s.images_per_s = w > 0 ? double(window_steps * options_.batch_size()) / w : 0.0;
      s.elapsed_s = since(t0);
      s.window_s = w;
      s.communication_s = comm_s_;
      comm_s_ = 0;
      log(s);
      loss_sum = 0;
      loss_n = 0;
      window_steps = 0;
      window_start = clock::now();
    }
    if (!options_.checkpoint_dir().empty() && ((options_.ckpt_every() > 0 && step_ % options_.ckpt_every() == 0) || last))
      save_checkpoint();
  }
}

Pretrainer::Pretrainer(DiT model, std::shared_ptr<const TrainingData> data, FinetuneOptions options)
    : Finetuner(std::move(model), std::move(data),
                (options.difffit() || options.minimax())
                    ? throw Error("Pretrainer: difffit and minimax must be off (use Finetuner for fine-tuning)")
                    : options) {}

}  // namespace mdd
