#include "mdd/train/vae_trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "mdd/data/training_data.h"
#include "mdd/io/image.h"
#include "mdd/io/safetensors.h"
#include "mdd/io/state_dict.h"
#include "mdd/io/weight_entry.h"
#include "mdd/train/checkpoint.h"
#include "mdd/util/error.h"
#include "train/data_parallel.h"
#include "util/file_util.h"
#include "util/splitmix.h"
#include "util/json_preview.h"
#include "util/enum_names.h"

namespace mdd {
namespace {

nlohmann::json loop_signature(const VaeTrainerOptions& o) {
  return {{"batch_size", o.batch_size()}, {"lr", o.lr()},         {"lr_warmup", o.lr_warmup()},
          {"kl_weight", o.kl_weight()},   {"reconstruction", o.reconstruction()}, {"hflip", o.hflip()},
          {"seed", std::to_string(o.seed())}, {"train_encoder", o.train_encoder()}};
}

// The encoder side of an AutoencoderKL: what `train_encoder(false)` freezes.
bool is_encoder_side(const std::string& name) {
  return name.rfind("encoder.", 0) == 0 || name.rfind("quant_conv.", 0) == 0;
}

uint64_t vae_step_seed(uint64_t seed, int64_t step) { return splitmix64(seed ^ splitmix64(0x7AE5u + uint64_t(step))); }



}  // namespace

torch::Tensor images_to_unit_range(const torch::Tensor& images_u8) {
  if (!images_u8.defined() || images_u8.dim() != 4 || images_u8.scalar_type() != torch::kUInt8)
    throw Error("images_to_unit_range: expected uint8 images [N, H, W, C]");
  return normalize(to_tensor(images_u8), {0.5}, {0.5});
}

namespace {
constexpr detail::EnumNames<ReconstructionLoss, 2> kReconstructionNames{
    {{ReconstructionLoss::kL1, "l1"}, {ReconstructionLoss::kMse, "mse"}}};
}  // namespace

const char* reconstruction_loss_name(ReconstructionLoss r) { return detail::enum_name(kReconstructionNames, r); }

ReconstructionLoss parse_reconstruction_loss(const std::string& name) {
  return detail::parse_enum(kReconstructionNames, "VaeTrainer: reconstruction", name);
}

void check_options(const VaeTrainerOptions& o, const OptionFail& fail) {
  if (o.steps() < 0) fail("steps", fmt::format("must be >= 0, got {}", o.steps()));
  if (o.batch_size() <= 0) fail("batch_size", fmt::format("must be > 0, got {}", o.batch_size()));
  for (auto [name, v] : {std::pair<const char*, int64_t>{"lr_warmup", o.lr_warmup()}, {"ckpt_every", o.ckpt_every()},
                         {"log_every", o.log_every()}, {"keep_checkpoints", o.keep_checkpoints()}})
    if (v < 0) fail(name, fmt::format("must be >= 0, got {}", v));
  if (!(o.lr() > 0) || !std::isfinite(o.lr())) fail("lr", fmt::format("must be finite and > 0, got {}", o.lr()));
  if (!(o.kl_weight() >= 0) || !std::isfinite(o.kl_weight()))
    fail("kl_weight", fmt::format("must be finite and >= 0, got {}", o.kl_weight()));
  try {
    parse_reconstruction_loss(o.reconstruction());
  } catch (const Error& e) {
    fail("reconstruction", std::string("is invalid: ") + e.what());
  }
}

VaeTrainer::VaeTrainer(AutoencoderKL vae, LabeledImages images, VaeTrainerOptions options)
    : vae_(std::move(vae)), data_(std::move(images)), options_(std::move(options)) {
  if (!vae_) throw Error("VaeTrainer: empty AutoencoderKL");
  const auto& o = options_;
  if (!data_.images.defined() || data_.images.dim() != 4 || data_.images.scalar_type() != torch::kUInt8)
    throw Error("VaeTrainer: images must be uint8 [N, H, W, C]");
  const int64_t n = data_.images.size(0), h = data_.images.size(1), w = data_.images.size(2), c = data_.images.size(3);
  const int64_t f = vae_->downsample_factor();
  if (c != vae_->options.in_channels() || c != vae_->options.out_channels())
    throw Error(fmt::format("VaeTrainer: images have {} channels but the VAE takes {} and makes {}", c,
                            vae_->options.in_channels(), vae_->options.out_channels()));
  if (h % f != 0 || w % f != 0)
    throw Error(fmt::format("VaeTrainer: image size {}x{} is not a multiple of the VAE's downsampling factor {}", h, w, f));
  check_options(o, throw_option_error("VaeTrainer"));
  if (n < o.batch_size()) throw Error(fmt::format("VaeTrainer: batch_size {} exceeds the {} images", o.batch_size(), n));
  reconstruction_ = parse_reconstruction_loss(o.reconstruction());
  precision_ = resolve_precision(o.precision(), o.device());
  vae_->to(o.device());
  vae_->runtime.slice_size(0).tiling(false);
  vae_->train();
  for (auto& kv : vae_->named_parameters()) {
    const bool train = o.train_encoder() || !is_encoder_side(kv.key());
    kv.value().set_requires_grad(train);
    if (train) trained_.push_back(kv.value());
  }
  optimizer_ = std::make_unique<AdamW>(trained_, AdamWOptions().lr(o.lr()));
  if (o.process_group().world_size() > 1) {
    detail::check_batch_divides("VaeTrainer", o.batch_size(), o.process_group());
    const auto& a = vae_->options;
    const nlohmann::json same = {{"loop", loop_signature(o)},
                                 {"steps", o.steps()},
                                 {"precision", precision_name(precision_)},
                                 {"checkpoint_dir", o.checkpoint_dir()},
                                 {"ckpt_every", o.ckpt_every()},
                                 {"grad_reduce", {o.grad_bucket_bytes(), o.overlap_grad_reduce()}},
                                 {"vae", {a.block_out_channels(), a.latent_channels(), a.layers_per_block(),
                                          a.norm_num_groups(), a.in_channels()}},
                                 {"data", {n, h, w, c, data_.images.sum().item<int64_t>()}}};
    dist::ProcessGroup pg = o.process_group();  // a handle: copies share the group
    pg.check_same("VAE training configuration (options, architecture, images)", same.dump());
    detail::broadcast_from_main(pg, *vae_);
    if (o.overlap_grad_reduce()) averager_ = std::make_shared<detail::OverlappedGradAverager>(pg, trained_, o.grad_bucket_bytes());
  }
}

VaeTrainStats VaeTrainer::step() {
  const auto& o = options_;
  const int64_t b = o.batch_size(), n = data_.images.size(0);
  const int64_t per_epoch = n / b, epoch = step_ / per_epoch, k = step_ % per_epoch;
  if (epoch != order_epoch_) {
    order_ = epoch_order(n, o.seed(), epoch);
    order_epoch_ = epoch;
  }
  // The whole global batch is drawn on every rank, exactly as one process draws it; each rank then
  // keeps its rows, so the draws depend on neither the rank nor the number of ranks.
  auto gen = at::detail::createCPUGenerator(vae_step_seed(o.seed(), step_));
  const int64_t f = vae_->downsample_factor(), h = data_.images.size(1), w = data_.images.size(2);
  torch::Tensor index = order_.slice(0, k * b, (k + 1) * b);
  torch::Tensor flip = o.hflip() ? (torch::rand({b}, gen) < 0.5) : torch::Tensor();
  torch::Tensor noise = torch::randn({b, vae_->options.latent_channels(), h / f, w / f}, gen);
  dist::ProcessGroup pg = o.process_group();  // a handle: copies share the group
  const bool parallel = pg.world_size() > 1;
  if (parallel) {
    const auto [lo, hi] = detail::batch_shard(b, pg);
    index = index.slice(0, lo, hi);
    if (flip.defined()) flip = flip.slice(0, lo, hi);
    noise = noise.slice(0, lo, hi);
  }
  torch::Tensor x = images_to_unit_range(data_.images.index_select(0, index));
  if (flip.defined()) x = torch::where(flip.view({-1, 1, 1, 1}), x.flip({3}), x);
  const double lr = o.lr_warmup() > 0 ? o.lr() * std::min(1.0, double(step_ + 1) / double(o.lr_warmup())) : o.lr();
  optimizer_->set_lr(lr);
  optimizer_->zero_grad();
  x = x.to(o.device());
  torch::Tensor recon_err, kl;
  {
    AutocastGuard autocast(o.device(), precision_);
    DiagonalGaussian q = [&] {
      // A frozen encoder needs no graph: decoder-only steps cost about half a joint step.
      torch::AutoGradMode grad(o.train_encoder());
      return vae_->encode(x);
    }();
    const torch::Tensor mean = q.mean.to(torch::kFloat32), logvar = q.logvar.to(torch::kFloat32);
    const torch::Tensor z = mean + torch::exp(0.5 * logvar) * noise.to(o.device());
    const torch::Tensor xr = vae_->decode(z).to(torch::kFloat32);
    const torch::Tensor d = xr - x;
    recon_err = reconstruction_ == ReconstructionLoss::kL1 ? d.abs().mean() : d.pow(2).mean();
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean();
  }
  const torch::Tensor loss = recon_err + o.kl_weight() * kl;
  // [loss, reconstruction, kl] of the whole batch: the mean of the ranks' equal shares.
  torch::Tensor stats = torch::stack({loss.detach(), recon_err.detach(), kl.detach()}).to(torch::kCPU, torch::kFloat64);
  if (averager_) averager_->arm();
  loss.backward();
  if (parallel) {
    const auto c0 = std::chrono::steady_clock::now();
    if (averager_)
      averager_->finish();  // most buckets were reduced during the backward
    else
      detail::average_gradients(pg, trained_, o.grad_bucket_bytes());
    std::vector<torch::Tensor> st{stats};
    pg.all_reduce_mean(st);
    comm_s_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - c0).count();
  }
  // Checked after the collectives, so every rank sees the same value and stops together; the
  // weights are not updated with a non-finite gradient.
  const double lv = stats[0].item<double>();
  if (!std::isfinite(lv))
    throw Error(fmt::format("VAE training diverged: loss is {} at step {}; lower the learning rate", lv, step_ + 1));
  optimizer_->step();
  ++step_;
  VaeTrainStats s;
  s.step = step_;
  s.total = o.steps();
  s.loss = lv;
  s.reconstruction = stats[1].item<double>();
  s.kl = stats[2].item<double>();
  return s;
}

std::string VaeTrainer::save_checkpoint() {
  if (options_.checkpoint_dir().empty()) throw Error("VaeTrainer::save_checkpoint: no checkpoint_dir set");
  return detail::write_checkpoint_on_main(options_.process_group(), [&] { return write_own_checkpoint(); },
                                          options_.checkpoint_dir(), step_);
}

std::string VaeTrainer::write_own_checkpoint() {
  io::TensorMap t = with_prefix(state_dict(*vae_), std::string(io::kModelEntry) + ".");
  for (auto& kv : optimizer_->state("opt.")) t.emplace(kv);
  const auto& a = vae_->options;
  nlohmann::json meta = {{"format", "mdd-vae-train-checkpoint"},
                         {"loop", loop_signature(options_)},
                         {"steps_planned", options_.steps()},
                         {"vae", {{"block_out_channels", a.block_out_channels()},
                                  {"latent_channels", a.latent_channels()},
                                  {"layers_per_block", a.layers_per_block()},
                                  {"norm_num_groups", a.norm_num_groups()},
                                  {"in_channels", a.in_channels()}}}};
  return write_checkpoint(options_.checkpoint_dir(), step_, t, meta.dump(), options_.keep_checkpoints()).weights_path;
}

bool VaeTrainer::resume(const LogFn& log) {
  if (options_.checkpoint_dir().empty()) return false;
  return detail::resume_in_order(options_.process_group(), [&](bool main) { return resume_own(main ? log : LogFn()); },
                                 [&] { return step_; });
}

bool VaeTrainer::resume_own(const LogFn& log) {
  auto ck = open_checkpoint_for_resume(options_.checkpoint_dir(), log);
  if (!ck) return false;
  const nlohmann::json meta = nlohmann::json::parse(ck->meta_json, nullptr, /*allow_exceptions=*/false);
  if (meta.is_discarded() || !meta.is_object() || !meta.contains("loop") || !meta["loop"].is_object())
    throw Error(ck->info.meta_path + ": not an mdd VAE training checkpoint (no 'loop')");
  const nlohmann::json want = loop_signature(options_);
  for (auto it = want.begin(); it != want.end(); ++it)
    if (!meta["loop"].contains(it.key()) || meta["loop"][it.key()] != it.value())
      throw Error(fmt::format("{}: cannot resume: '{}' was {} in the checkpointed run and is {} now", ck->info.meta_path,
                              it.key(), detail::json_preview(meta["loop"].value(it.key(), nlohmann::json())), detail::json_preview(it.value())));
  load_state_dict(*vae_, strip_prefix(ck->tensors, std::string(io::kModelEntry) + "."), /*strict=*/true);
  optimizer_->load_state(ck->tensors, "opt.");
  step_ = ck->info.step;
  return true;
}

void VaeTrainer::train(const ProgressFn& progress, const VaeTrainLogFn& log, const std::string& stage) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  auto since = [](clock::time_point a) { return std::chrono::duration<double>(clock::now() - a).count(); };
  double sum = 0;
  int64_t cnt = 0;
  auto window = clock::now();
  if (progress) progress({stage, step_, options_.steps(), 0.0});
  while (step_ < options_.steps()) {
    VaeTrainStats s = step();
    sum += s.loss;
    ++cnt;
    if (progress) progress({stage, step_, options_.steps(), since(t0)});
    const bool last = step_ == options_.steps();
    if (log && options_.log_every() > 0 && (step_ % options_.log_every() == 0 || last)) {
      s.mean_loss = sum / double(cnt);
      const double w = since(window);
      s.images_per_s = w > 0 ? double(cnt * options_.batch_size()) / w : 0.0;
      s.elapsed_s = since(t0);
      s.communication_s = comm_s_;
      log(s);
      sum = 0;
      cnt = 0;
      comm_s_ = 0;
      window = clock::now();
    }
    if (!options_.checkpoint_dir().empty() &&
        ((options_.ckpt_every() > 0 && step_ % options_.ckpt_every() == 0) || last))
      save_checkpoint();
  }
  vae_->eval();
}

double reconstruction_psnr(AutoencoderKL vae, const torch::Tensor& images_u8, torch::Tensor* reconstructions,
                           int64_t batch_size) {
  if (!vae) throw Error("reconstruction_psnr: empty AutoencoderKL");
  if (batch_size <= 0) throw Error("reconstruction_psnr: batch_size must be > 0");
  torch::NoGradGuard ng;
  const bool was_training = vae->is_training();
  vae->eval();
  const auto dev = vae->parameters().empty() ? torch::Device(torch::kCPU) : vae->parameters().front().device();
  double se = 0;
  std::vector<torch::Tensor> outs;
  const int64_t n = images_u8.size(0);
  for (int64_t s = 0; s < n; s += batch_size) {
    const auto x8 = images_u8.slice(0, s, std::min(n, s + batch_size));
    const auto x = images_to_unit_range(x8).to(dev);
    const auto r8 = to_uint8_image(vae->decode(vae->encode(x).mean).to(torch::kCPU, torch::kFloat32));
    se += (r8.to(torch::kFloat64) - x8.to(torch::kFloat64)).pow(2).sum().item<double>();
    if (reconstructions) outs.push_back(r8);
  }
  vae->train(was_training);
  if (reconstructions) *reconstructions = torch::cat(outs);
  const double mse = se / double(images_u8.numel());
  return mse == 0 ? std::numeric_limits<double>::infinity() : 10.0 * std::log10(255.0 * 255.0 / mse);
}

double fit_scaling_factor(AutoencoderKL vae, const torch::Tensor& images_u8, int64_t max_images) {
  torch::NoGradGuard ng;
  const bool was_training = vae->is_training();
  vae->eval();
  const auto dev = vae->parameters().front().device();
  const int64_t n = std::min(max_images, images_u8.size(0));
  std::vector<torch::Tensor> means;
  for (int64_t s = 0; s < n; s += 256)
    means.push_back(vae->encode(images_to_unit_range(images_u8.slice(0, s, std::min(n, s + 256))).to(dev)).mean.cpu());
  vae->train(was_training);
  const double sd = torch::cat(means).to(torch::kFloat64).std().item<double>();
  if (!(sd > 0) || !std::isfinite(sd)) throw Error("fit_scaling_factor: the latents have no spread (std " + std::to_string(sd) + ")");
  return 1.0 / sd;
}

void save_pretrained(const AutoencoderKL& vae, const std::string& dir, const std::map<std::string, std::string>& metadata) {
  const auto& o = vae->options;
  nlohmann::json cfg = {{"_class_name", "AutoencoderKL"},
                        {"in_channels", o.in_channels()},
                        {"out_channels", o.out_channels()},
                        {"latent_channels", o.latent_channels()},
                        {"block_out_channels", o.block_out_channels()},
                        {"layers_per_block", o.layers_per_block()},
                        {"norm_num_groups", o.norm_num_groups()},
                        {"scaling_factor", o.scaling_factor()},
                        {"sample_size", o.sample_size()},
                        {"act_fn", "silu"},
                        {"down_block_types", std::vector<std::string>(o.block_out_channels().size(), "DownEncoderBlock2D")},
                        {"up_block_types", std::vector<std::string>(o.block_out_channels().size(), "UpDecoderBlock2D")}};
  write_text_file_atomic((std::filesystem::path(dir) / "config.json").string(), cfg.dump(2));
  std::map<std::string, std::string> meta = metadata;
  meta["format"] = "pt";
  io::save_safetensors((std::filesystem::path(dir) / "diffusion_pytorch_model.safetensors").string(), state_dict(*vae), meta);
}

}  // namespace mdd
