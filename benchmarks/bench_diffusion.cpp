// Diffusion microbenchmarks on DiT-S/2 at a 32x32x4 latent (256 px images), batch 8:
//  - one guided ancestral step (p_sample through the Sampler's CFG model: DiT forward on 16 rows);
//  - training_losses forward + backward (the fine-tuning inner step, without the minimax terms).
#include <benchmark/benchmark.h>

#include <torch/torch.h>

#include "mdd/diffusion/gaussian_diffusion.h"
#include "mdd/diffusion/sampler.h"
#include "mdd/models/dit.h"

namespace {

constexpr int64_t kBatch = 8;

torch::Device bench_device() { return torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::kCPU; }

void sync(const torch::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize();
}

mdd::DiT make_dit(const torch::Device& device) {
  torch::manual_seed(0);
  mdd::DiT model(mdd::dit_options("DiT-S/2", 32, 1000));
  // Non-zero adaLN/final weights so the step does real work on every path (reference init zeroes them).
  torch::NoGradGuard ng;
  for (auto& p : model->parameters()) {
    if (p.requires_grad()) p.normal_(0.0, 0.02);
  }
  model->to(device);
  return model;
}

void BM_SamplerStepCfg_DiTS2(benchmark::State& state) {
  const auto device = bench_device();
  auto model = make_dit(device);
  model->eval();
  mdd::Sampler sampler([&](const torch::Tensor& x, const torch::Tensor& t,
                           const torch::Tensor& y) { return model->forward(x, t, y); },
                       mdd::SamplerOptions().batch_size(kBatch).device(device));
  const auto labels = torch::arange(kBatch, torch::kInt64).to(device);
  const auto guided = sampler.guided_model(labels);
  const auto opts = torch::TensorOptions().device(device);
  const auto x = torch::randn({kBatch, 4, 32, 32}, opts);
  const auto noise = torch::randn({kBatch, 4, 32, 32}, opts);
  const auto t = torch::full({kBatch}, 25, opts.dtype(torch::kInt64));
  torch::NoGradGuard ng;
  for (auto _ : state) {
    auto out = sampler.diffusion().p_sample(guided, x, t, noise);
    sync(device);
    benchmark::DoNotOptimize(out.data_ptr());
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
  state.SetLabel(device.str());
}
BENCHMARK(BM_SamplerStepCfg_DiTS2)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_TrainingLossesFwdBwd_DiTS2(benchmark::State& state) {
  const auto device = bench_device();
  auto model = make_dit(device);
  model->train();
  mdd::GaussianDiffusion diffusion;
  const auto opts = torch::TensorOptions().device(device);
  const auto x0 = torch::randn({kBatch, 4, 32, 32}, opts);
  const auto noise = torch::randn({kBatch, 4, 32, 32}, opts);
  const auto t = torch::randint(0, 1000, {kBatch}, opts.dtype(torch::kInt64));
  const auto y = torch::randint(0, 1000, {kBatch}, opts.dtype(torch::kInt64));
  const mdd::ModelFn fn = [&](const torch::Tensor& x, const torch::Tensor& tt) { return model->forward(x, tt, y); };
  for (auto _ : state) {
    model->zero_grad();
    auto l = diffusion.training_losses(fn, x0, t, noise);
    l.loss.mean().backward();
    sync(device);
    benchmark::DoNotOptimize(l.pred_xstart.data_ptr());
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
  state.SetLabel(device.str());
}
BENCHMARK(BM_TrainingLossesFwdBwd_DiTS2)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
