// DiT step timings: DiT-S/2 on 32x32 latents (256 px images), batch 8, as in the paper's
// fine-tuning batch. Run: ./bench_models --benchmark_filter=DiT
#include <benchmark/benchmark.h>

#include <torch/torch.h>

#include "mdd/models/difffit.h"
#include "mdd/models/dit.h"

namespace {

constexpr int64_t kBatch = 8;
constexpr int64_t kLatent = 32;

struct Inputs {
  torch::Tensor x, t, y;
};

Inputs make_inputs(const mdd::DiT& model) {
  auto gen = at::detail::createCPUGenerator(0);
  return {torch::randn({kBatch, 4, kLatent, kLatent}, gen),
          torch::randint(0, 1000, {kBatch}, gen, torch::kLong),
          torch::randint(0, model->null_class() + 1, {kBatch}, gen, torch::kLong)};
}

mdd::DiT make_model(const char* name) {
  mdd::DiT model(mdd::dit_options(name, kLatent, 1000));
  // Non-zero adaLN/final weights so the timed work is not a multiply-by-zero special case.
  model->initialize_weights(at::detail::createCPUGenerator(1));
  torch::NoGradGuard no_grad;
  for (auto& p : model->parameters())
    if (p.requires_grad()) p.add_(torch::randn(p.sizes(), at::detail::createCPUGenerator(2)) * 0.01);
  return model;
}

// Inference step (sampling): eval mode, no autograd.
void BM_DiT_S2_Forward(benchmark::State& state) {
  auto model = make_model("DiT-S/2");
  model->eval();
  const auto in = make_inputs(model);
  torch::NoGradGuard no_grad;
  for (auto _ : state) benchmark::DoNotOptimize(model->forward(in.x, in.t, in.y));
  state.SetItemsProcessed(state.iterations() * kBatch);
}
BENCHMARK(BM_DiT_S2_Forward)->Unit(benchmark::kMillisecond)->MinTime(2.0);

// Classifier-free guided step as the sampler runs it (2B rows for B samples).
void BM_DiT_S2_ForwardWithCfg(benchmark::State& state) {
  auto model = make_model("DiT-S/2");
  model->eval();
  auto in = make_inputs(model);
  in.y.narrow(0, kBatch / 2, kBatch / 2).fill_(model->null_class());
  torch::NoGradGuard no_grad;
  for (auto _ : state) benchmark::DoNotOptimize(model->forward_with_cfg(in.x, in.t, in.y, 4.0));
  state.SetItemsProcessed(state.iterations() * kBatch);
}
BENCHMARK(BM_DiT_S2_ForwardWithCfg)->Unit(benchmark::kMillisecond)->MinTime(2.0);

// Training step, all parameters trainable: forward + backward (no optimizer).
void BM_DiT_S2_ForwardBackward(benchmark::State& state) {
  auto model = make_model("DiT-S/2");
  model->train();
  model->set_label_dropout_generator(at::detail::createCPUGenerator(3));
  const auto in = make_inputs(model);
  for (auto _ : state) {
    model->zero_grad();
    model->forward(in.x, in.t, in.y).square().mean().backward();
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}
BENCHMARK(BM_DiT_S2_ForwardBackward)->Unit(benchmark::kMillisecond)->MinTime(2.0);

// DiffFit training step: only biases, gammas and the label table need gradients.
void BM_DiT_S2_DiffFitForwardBackward(benchmark::State& state) {
  auto model = make_model("DiT-S/2");
  mdd::apply_difffit(model);
  model->train();
  model->set_label_dropout_generator(at::detail::createCPUGenerator(3));
  const auto in = make_inputs(model);
  for (auto _ : state) {
    model->zero_grad();
    model->forward(in.x, in.t, in.y).square().mean().backward();
  }
  state.SetItemsProcessed(state.iterations() * kBatch);
}
BENCHMARK(BM_DiT_S2_DiffFitForwardBackward)->Unit(benchmark::kMillisecond)->MinTime(2.0);

}  // namespace

BENCHMARK_MAIN();
