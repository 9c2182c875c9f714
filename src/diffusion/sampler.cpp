#include "mdd/diffusion/sampler.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <chrono>
#include <cmath>
#include <sstream>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "mdd/util/error.h"
#include "util/splitmix.h"
#include "util/shape_str.h"
#include "util/enum_names.h"

namespace mdd {

namespace {
constexpr detail::EnumNames<SamplingMethod, 2> kMethodNames{{{SamplingMethod::kDDPM, "ddpm"}, {SamplingMethod::kDDIM, "ddim"}}};
}  // namespace

const char* sampling_method_name(SamplingMethod m) { return detail::enum_name(kMethodNames, m); }

SamplingMethod parse_sampling_method(const std::string& name) {
  return detail::parse_enum(kMethodNames, "sampling method", name);
}

namespace {

const SamplerOptions& validated(const SamplerOptions& o) {
  check_options(o, throw_option_error("SamplerOptions"));
  return o;
}

}  // namespace

void check_options(const SamplerOptions& o, const OptionFail& fail) {
  if (o.batch_size() < 1) fail("batch_size", fmt::format("must be >= 1, got {}", o.batch_size()));
  // Negative scales would push samples away from their class: almost surely a sign error.
  if (!(o.cfg_scale() >= 0) || !std::isfinite(o.cfg_scale()))
    fail("cfg_scale", fmt::format("must be finite and >= 0, got {}", o.cfg_scale()));
  if (!(o.eta() >= 0.0) || !std::isfinite(o.eta())) fail("eta", fmt::format("must be finite and >= 0, got {}", o.eta()));
  if (o.latent_shape().size() != 3) {
    fail("latent_shape", fmt::format("must be [C, H, W], got {} dims", o.latent_shape().size()));
  } else {
    for (auto v : o.latent_shape())
      if (v < 1) fail("latent_shape", fmt::format("entries must be >= 1, got {}", fmt::join(o.latent_shape(), ", ")));
  }
  if (!o.cfg_interval().empty()) {
    const auto& iv = o.cfg_interval();
    if (iv.size() != 2 || iv[0] < 0 || iv[1] < iv[0])
      fail("cfg_interval", fmt::format("must be empty or [lo, hi] with 0 <= lo <= hi (training timesteps), got [{}]",
                                       fmt::join(iv, ", ")));
  }
  if (o.cfg_scale() != 1.0 && o.null_class() < 0)
    fail("null_class", fmt::format("must be >= 0 for classifier-free guidance (cfg_scale {}), got {}", o.cfg_scale(),
                                   o.null_class()));
}

uint64_t Sampler::image_seed(uint64_t seed, int64_t image_id) {
  return splitmix64(seed ^ splitmix64(static_cast<uint64_t>(image_id)));
}

Sampler::Sampler(ConditionalModelFn model, SamplerOptions options)
    : model_(std::move(model)), options_(validated(options)), diffusion_(options_.diffusion()) {
  if (!model_) throw Error("Sampler: empty model function");
}

torch::Tensor Sampler::check_labels(const torch::Tensor& labels) const {
  if (!labels.defined() || labels.dim() != 1) {
    throw Error(fmt::format("Sampler: labels must be a 1-D int64 tensor [N], got shape {}", shape_str(labels)));
  }
  if (labels.is_floating_point() || labels.is_complex() || labels.scalar_type() == torch::kBool) {
    throw Error(fmt::format("Sampler: labels must be integers, got {}", c10::toString(labels.scalar_type())));
  }
  auto y = labels.to(torch::kInt64);
  if (y.numel() > 0) {
    const int64_t lo = y.min().item<int64_t>();
    const int64_t hi = y.max().item<int64_t>();
    if (lo < 0 || (options_.null_class() >= 0 && hi > options_.null_class())) {
      throw Error(fmt::format("Sampler: labels must be in [0, {}] (null_class), got range [{}, {}]",
                              options_.null_class(), lo, hi));
    }
  }
  return y.to(options_.device());
}

ModelFn Sampler::guided_model(const torch::Tensor& labels_in) const {
  const torch::Tensor y = check_labels(labels_in);
  const ConditionalModelFn model = model_;
  const double scale = options_.cfg_scale();
  const c10::Device dev = options_.device();
  const Precision prec = resolve_precision(options_.precision(), dev);
  // The model runs under autocast; everything the diffusion loop does with its output is float32.
  auto call = [model, dev, prec](const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& yy) {
    AutocastGuard autocast(dev, prec);
    return model(x, t, yy).to(torch::kFloat32);
  };
  if (scale == 1.0) {
    return [call, y](const torch::Tensor& x, const torch::Tensor& t) { return call(x, t, y); };
  }
  const int64_t null_class = options_.null_class();
  const CfgGuidance rule = options_.guidance();
  const std::vector<int64_t> interval = options_.cfg_interval();
  return [call, y, scale, null_class, rule, interval](const torch::Tensor& x, const torch::Tensor& t) {
    const int64_t n = x.size(0);
    if (y.size(0) != n) {
      throw Error(fmt::format("Sampler: {} labels for a batch of {} latents", y.size(0), n));
    }
    torch::Tensor guided_rows;  // undefined: every row is guided
    if (!interval.empty()) {
      guided_rows = (t >= interval[0]).logical_and(t <= interval[1]);
      const int64_t k = guided_rows.sum().item<int64_t>();
      if (k == 0) return call(x, t, y);  // outside the interval: the conditional output alone
      if (k == n) guided_rows = torch::Tensor();
    }
    const auto y_in = torch::cat({y, torch::full_like(y, null_class)});
    const auto out = call(torch::cat({x, x}), torch::cat({t, t}), y_in);
    if (!out.defined() || out.dim() < 2 || out.size(0) != 2 * n || out.size(1) < x.size(1)) {
      throw Error(fmt::format("Sampler: model output has shape {} for a CFG batch of {} latents with {} channels",
                              shape_str(out), 2 * n, x.size(1)));
    }
    const auto guided = cfg_combine(out, scale, cfg_guided_channels(rule, x.size(1), out.size(1)));
    if (!guided_rows.defined()) return guided;
    // Rows at different timesteps (never in the sampling loops, whose batches share t): mix per row.
    const auto plain = out.narrow(0, 0, n);  // the conditional half
    auto mask = guided_rows.to(guided.device());
    while (mask.dim() < guided.dim()) mask = mask.unsqueeze(-1);
    return torch::where(mask, guided, plain);
  };
}

torch::Tensor Sampler::run(const torch::Tensor& labels, const torch::Tensor& x_T, const StepNoiseFn& step_noise,
                           const ProgressFn& on_step) const {
  torch::NoGradGuard no_grad;
  const ModelFn model = guided_model(labels);
  if (options_.method() == SamplingMethod::kDDIM) {
    return diffusion_.ddim_sample_loop(model, x_T, step_noise, options_.eta(), options_.clip_denoised(), on_step);
  }
  return diffusion_.p_sample_loop(model, x_T, step_noise, options_.clip_denoised(), on_step);
}

torch::Tensor Sampler::sample_from_noise(const torch::Tensor& labels, const torch::Tensor& x_T,
                                         const StepNoiseFn& step_noise, const ProgressFn& progress) const {
  const auto& ls = options_.latent_shape();
  if (!x_T.defined() || x_T.dim() != 4 || x_T.size(1) != ls[0] || x_T.size(2) != ls[1] || x_T.size(3) != ls[2]) {
    throw Error(fmt::format("Sampler::sample_from_noise: x_T has shape {}, expected [N, {}, {}, {}]", shape_str(x_T),
                            ls[0], ls[1], ls[2]));
  }
  if (!labels.defined() || labels.dim() != 1 || labels.size(0) != x_T.size(0)) {
    throw Error(fmt::format("Sampler::sample_from_noise: labels shape {} does not match x_T batch {}",
                            shape_str(labels), x_T.size(0)));
  }
  return run(labels, x_T.to(options_.device()), step_noise, progress);
}

torch::Tensor Sampler::sample(const torch::Tensor& labels, const ProgressFn& progress) const {
  if (!labels.defined() || labels.dim() != 1) {
    throw Error(fmt::format("Sampler::sample: labels must be a 1-D tensor [N], got shape {}", shape_str(labels)));
  }
  return sample(labels, torch::arange(labels.size(0), torch::kInt64), progress);
}

torch::Tensor Sampler::sample(const torch::Tensor& labels_in, const torch::Tensor& image_ids,
                              const ProgressFn& progress) const {
  const torch::Tensor labels = check_labels(labels_in);
  if (!image_ids.defined() || image_ids.dim() != 1 || image_ids.size(0) != labels.size(0) ||
      image_ids.is_floating_point()) {
    throw Error(fmt::format("Sampler::sample: image_ids must be an integer tensor [{}], got shape {}", labels.size(0),
                            shape_str(image_ids)));
  }
  const auto ids = image_ids.to(torch::kCPU, torch::kInt64).contiguous();
  const int64_t n = labels.size(0);
  const auto& ls = options_.latent_shape();
  const int64_t B = options_.batch_size();
  const int64_t S = diffusion_.num_timesteps();
  const int64_t num_batches = (n + B - 1) / B;
  const auto cpu_f32 = torch::TensorOptions().dtype(torch::kFloat32);
  const auto start = std::chrono::steady_clock::now();
  dist::ProcessGroup pg = options_.process_group();
  const int64_t world = pg.world_size(), rank = pg.rank();
  // This rank's batches: every world-th batch of the single-process sequence, so each batch has
  // exactly the composition it has in one process (the model's numerics may depend on it).
  const int64_t mine = num_batches > rank ? (num_batches - rank + world - 1) / world : 0;
  std::vector<torch::Tensor> outs;
  for (int64_t j = 0; j < mine; ++j) {
    const int64_t b = rank + j * world;
    const int64_t lo = b * B;
    const int64_t cnt = std::min(B, n - lo);
    // One generator per image: its noise never depends on which batch it lands in.
    std::vector<at::Generator> gens;
    gens.reserve(static_cast<size_t>(cnt));
    for (int64_t i = 0; i < cnt; ++i) {
      gens.push_back(at::detail::createCPUGenerator(image_seed(options_.seed(), ids[lo + i].item<int64_t>())));
    }
    auto draw = [&]() {
      std::vector<torch::Tensor> rows;
      rows.reserve(gens.size());
      for (auto& g : gens) rows.push_back(torch::randn({ls[0], ls[1], ls[2]}, g, cpu_f32));
      return torch::stack(rows).to(options_.device());
    };
    const auto x_T = draw();
    const StepNoiseFn step_noise = [&](int64_t, const torch::Tensor&) { return draw(); };
    ProgressFn on_step;
    if (progress) {
      on_step = [&](const Progress& p) {
        const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        progress(Progress{"sample", j * S + p.step, mine * S, el});
      };
    }
    outs.push_back(run(labels.narrow(0, lo, cnt), x_T, step_noise, on_step));
  }
  if (world > 1) return gather_batches(pg, outs, n);
  if (outs.empty()) {
    return torch::empty({0, ls[0], ls[1], ls[2]}, cpu_f32.device(options_.device()));
  }
  return torch::cat(outs);
}

torch::Tensor Sampler::gather_batches(dist::ProcessGroup& pg, const std::vector<torch::Tensor>& outs, int64_t n) const {
  // Every rank contributes the same shape (all_gather's rule): its batches padded to
  // ceil(batches / W) full batches; rank r's j-th slot is global batch r + j·W.
  const auto& ls = options_.latent_shape();
  const int64_t B = options_.batch_size(), world = pg.world_size();
  const int64_t num_batches = (n + B - 1) / B;
  const int64_t slots = (num_batches + world - 1) / world;
  torch::Tensor local = torch::zeros({slots * B, ls[0], ls[1], ls[2]}, torch::kFloat32);
  for (size_t j = 0; j < outs.size(); ++j) local.narrow(0, int64_t(j) * B, outs[j].size(0)).copy_(outs[j]);
  // Shares are unequal (1 batch on 2 ranks leaves one idle), so a rank may wait a whole batch's
  // compute time for the others: wait through the barrier with its own limit, so that the collective
  // timeout (DistOptions::timeout) bounds only the transfer. Without it a rank waiting longer than 5
  // minutes for a slow batch failed (seen: IPC 1 sampling on a loaded 2-core machine).
  pg.barrier(std::chrono::hours(72));
  const torch::Tensor all = pg.all_gather(local);  // [world * slots * B, ...]
  std::vector<torch::Tensor> ordered;
  ordered.reserve(size_t(num_batches));
  for (int64_t b = 0; b < num_batches; ++b) {
    const int64_t r = b % world, j = b / world;
    ordered.push_back(all.narrow(0, (r * slots + j) * B, std::min(B, n - b * B)));
  }
  if (ordered.empty()) return torch::empty({0, ls[0], ls[1], ls[2]}, torch::TensorOptions(torch::kFloat32).device(options_.device()));
  return torch::cat(ordered).to(options_.device());
}

}  // namespace mdd
