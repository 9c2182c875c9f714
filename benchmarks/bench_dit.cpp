// DiT step timings: DiT-S/2 on 32x32 latents (256 px images), batch 8, as in the paper's
// fine-tuning batch. Run: ./bench_models --benchmark_filter=DiT
#include <benchmark/benchmark.h>

#include <torch/torch.h>

#include "mdd/models/difffit.h"
#include "mdd/models/dit.h"
#include "mdd/util/precision.h"
#include "models/fused_dit.h"

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

// No-grad forward through the fused CPU kernels (DiTOptions::fused, the default) against the module
// path, in fp32 and under bf16 autocast. Args: {model: 0 = the Fashion-MNIST demo's latent DiT
// (7x7x4, patch 1, width 96, depth 4) at batch 200 = one CFG step of 100 images, 1 = DiT-S/2 at
// batch 8; fused: 0/1; precision: 0 = fp32, 1 = bf16}. Compare rows of one run:
//   bench_models --benchmark_filter=DiTInference --benchmark_repetitions=3 --benchmark_enable_random_interleaving=true
// A DiT with reference initialisation plus small noise on every trained parameter (the
// zero-initialised adaLN and final layers would otherwise make most of the block a no-op).
mdd::DiT perturbed_dit(const mdd::DiTOptions& o) {
  mdd::DiT model(o);
  model->initialize_weights(at::detail::createCPUGenerator(1));
  torch::NoGradGuard no_grad;
  for (auto& p : model->parameters())
    if (p.requires_grad()) p.add_(torch::randn(p.sizes(), at::detail::createCPUGenerator(2)) * 0.02);
  return model;
}

void BM_DiTInference(benchmark::State& state) {
  const bool demo = state.range(0) == 0, fused = state.range(1) != 0;
  const auto precision = state.range(2) != 0 ? mdd::Precision::kBF16 : mdd::Precision::kFP32;
  mdd::DiTOptions o = demo ? mdd::DiTOptions(7, 1, 4, 96, 4, 4).num_classes(10) : mdd::dit_options("DiT-S/2", kLatent, 1000);
  mdd::DiT model = perturbed_dit(o.fused(fused));
  model->eval();
  const int64_t batch = demo ? 200 : kBatch, size = o.input_size();
  auto gen = at::detail::createCPUGenerator(0);
  const auto x = torch::randn({batch, 4, size, size}, gen);
  const auto t = torch::randint(0, 1000, {batch}, gen, torch::kLong);
  const auto y = torch::randint(0, o.num_classes() + 1, {batch}, gen, torch::kLong);
  torch::NoGradGuard no_grad;
  mdd::AutocastGuard autocast(torch::kCPU, precision);
  for (auto _ : state) benchmark::DoNotOptimize(model->forward(x, t, y));
  state.SetItemsProcessed(state.iterations() * batch);
  state.SetLabel(std::string(demo ? "demo b200 " : "S/2 b8 ") + (fused ? "fused " : "module ") +
                 mdd::describe_precision(precision, torch::kCPU));
}
BENCHMARK(BM_DiTInference)
    ->ArgsProduct({{0, 1}, {0, 1}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->MinTime(1.0);

// Forward + backward of a DiT (what a training step spends outside the optimizer) through the
// fused training kernels (autograd functions, DiTOptions::fused) against the module path. Args:
// {model: 0 = the demo's pixel-space generator (28 px, patch 4, width 96, depth 4) at batch 64, as
// side_by_side.py's demo_train_b64; 1 = DiT-S/2 at batch 8; fused: 0/1; precision: 0 = fp32,
// 1 = bf16}. Compare rows of one run:
//   bench_models --benchmark_filter=DiTTraining --benchmark_repetitions=3 --benchmark_enable_random_interleaving=true
void BM_DiTTraining(benchmark::State& state) {
  const bool demo = state.range(0) == 0, fused = state.range(1) != 0;
  const auto precision = state.range(2) != 0 ? mdd::Precision::kBF16 : mdd::Precision::kFP32;
  mdd::DiTOptions o = demo ? mdd::DiTOptions(28, 4, 1, 96, 4, 4).num_classes(10) : mdd::dit_options("DiT-S/2", kLatent, 1000);
  mdd::DiT model = perturbed_dit(o.fused(fused));
  model->train();
  const int64_t batch = demo ? 64 : kBatch, size = o.input_size();
  auto gen = at::detail::createCPUGenerator(0);
  const auto x = torch::randn({batch, o.in_channels(), size, size}, gen);
  const auto t = torch::randint(0, 1000, {batch}, gen, torch::kLong);
  const auto y = torch::randint(0, o.num_classes(), {batch}, gen, torch::kLong);
  for (auto _ : state) {
    model->zero_grad();
    torch::Tensor out;
    {
      mdd::AutocastGuard autocast(torch::kCPU, precision);
      out = model->forward(x, t, y);
    }
    out.to(torch::kFloat32).square().mean().backward();
  }
  state.SetItemsProcessed(state.iterations() * batch);
  state.SetLabel(std::string(demo ? "demo b64 " : "S/2 b8 ") + (fused ? "fused " : "module ") +
                 mdd::describe_precision(precision, torch::kCPU));
}
BENCHMARK(BM_DiTTraining)
    ->ArgsProduct({{0, 1}, {0, 1}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->MinTime(1.0);

// The inference attention kernel alone on bf16 qkv, bias folded in as the block does: the float32-math
// kernel against the bf16 dot-product one (AVX512_BF16; without it both rows run the float kernel).
// Args: {shape: 0 = demo CFG batch (200 samples, 49 tokens, width 96, 4 heads), 1 = DiT-S/2 at batch 8
// (256 tokens, width 384, 6 heads); dot: 0/1}. Compare rows of one run:
//   bench_models --benchmark_filter=DiTAttention --benchmark_repetitions=5 --benchmark_enable_random_interleaving=true
void BM_DiTAttention(benchmark::State& state) {
  const bool demo = state.range(0) == 0, dot = state.range(1) != 0;
  const int64_t B = demo ? 200 : kBatch, N = demo ? 49 : 256, D = demo ? 96 : 384, H = demo ? 4 : 6;
  auto gen = at::detail::createCPUGenerator(0);
  const auto qkv = torch::randn({B, N, 3 * D}, gen).to(torch::kBFloat16);
  const auto bias = torch::randn({3 * D}, gen) * 0.1;
  const bool prev = mdd::detail::set_bf16_dot_attention(dot);
  for (auto _ : state) benchmark::DoNotOptimize(mdd::detail::attention_from_qkv(qkv, H, torch::Tensor(), bias));
  mdd::detail::set_bf16_dot_attention(prev);
  state.SetItemsProcessed(state.iterations() * B);
  state.SetLabel(std::string(demo ? "demo b200 " : "S/2 b8 ") +
                 (dot && mdd::detail::bf16_dot_attention_available() ? "bf16 dot products" : "float32 math"));
}
BENCHMARK(BM_DiTAttention)->ArgsProduct({{0, 1}, {0, 1}})->Unit(benchmark::kMillisecond)->MinTime(1.0);

BENCHMARK_MAIN();
