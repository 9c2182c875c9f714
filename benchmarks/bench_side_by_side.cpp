// The mdd half of benchmarks/side_by_side.py: the same workloads, named `<workload>/<precision>`,
// which the script runs alternately with its PyTorch eager implementation and prints as ratios.
//   demo_forward_b200  demo_train_b64  s2_forward_b8  s2_train_b8  demo_sample_100  dc_eval_100
// (see the script's docstring). Weights and data are random: speed does not depend on them.
// The host allocator is tuned as in the programs (mdd/util/host_allocator.h) unless
// MDD_HOST_ALLOCATOR=default. MDD_DIT_FUSED=0 runs the DiTs on the module path (DiTOptions::fused
// false), to measure what the fused CPU kernels add in the same run; MDD_BF16_DOT=0 keeps bf16
// inference attention on its float32-math kernel (mdd::detail::set_bf16_dot_attention).
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <string>

#include <torch/torch.h>

#include "mdd/data/latent_cache.h"
#include "mdd/data/training_data.h"
#include "mdd/diffusion/sampler.h"
#include "mdd/eval/evaluator.h"
#include "mdd/models/codec.h"
#include "mdd/models/dit.h"
#include "mdd/train/finetune.h"
#include "mdd/util/host_allocator.h"
#include "mdd/util/precision.h"
#include "models/fused_dit.h"

namespace {

bool dit_fused() {
  const char* v = std::getenv("MDD_DIT_FUSED");
  return v == nullptr || std::string(v) != "0";
}

mdd::DiT demo_dit() {
  mdd::DiT m(mdd::DiTOptions(28, 4, 1, 96, 4, 4).num_classes(10).fused(dit_fused()));
  auto g = at::detail::createCPUGenerator(1);
  m->initialize_weights(g);
  torch::NoGradGuard ng;
  for (auto& p : m->parameters()) p.add_(torch::randn(p.sizes(), g) * 0.02);  // no all-zero adaLN
  return m;
}

mdd::DiT s2_dit() {
  mdd::DiT m(mdd::dit_options("DiT-S/2").fused(dit_fused()));
  auto g = at::detail::createCPUGenerator(1);
  m->initialize_weights(g);
  return m;
}

// Random uint8 "images" [n, size, size, channels] cached as identity latents.
std::shared_ptr<mdd::LatentTrainingData> sbs_random_data(int64_t n, int64_t size, int64_t channels, int64_t classes) {
  auto g = at::detail::createCPUGenerator(0);
  mdd::LabeledImages imgs;
  imgs.images = torch::randint(0, 256, {n, size, size, channels}, g, torch::kInt64).to(torch::kUInt8);
  imgs.labels = torch::arange(n, torch::kInt64).remainder(classes);
  mdd::IdentityCodec codec;
  const std::string path = "/tmp/mdd_bench_sbs_" + std::to_string(size) + "x" + std::to_string(channels) + ".safetensors";
  return std::make_shared<mdd::LatentTrainingData>(mdd::LatentCache::build(path, codec, imgs), classes);
}

void forward(benchmark::State& state, mdd::DiT m, int64_t batch, std::vector<int64_t> shape, int64_t classes,
             mdd::Precision p) {
  m->eval();
  auto g = at::detail::createCPUGenerator(2);
  std::vector<int64_t> full{batch};
  full.insert(full.end(), shape.begin(), shape.end());
  auto x = torch::randn(full, g);
  auto t = torch::randint(0, 1000, {batch}, g, torch::kLong);
  auto y = torch::randint(0, classes, {batch}, g, torch::kLong);
  torch::NoGradGuard ng;
  for (auto _ : state) {
    mdd::AutocastGuard ac(torch::kCPU, p);
    benchmark::DoNotOptimize(m->forward(x, t, y).data_ptr());
  }
  state.SetLabel(mdd::describe_precision(p, torch::kCPU));
}

void train(benchmark::State& state, mdd::DiT m, std::shared_ptr<mdd::LatentTrainingData> data, int64_t batch,
           mdd::Precision p) {
  mdd::Pretrainer pt(m, data, mdd::pretrain_defaults().batch_size(batch).steps(1 << 30).log_every(0).precision(p));
  pt.step();  // allocate optimizer state
  for (auto _ : state) benchmark::DoNotOptimize(pt.step().loss);
  state.SetLabel(mdd::describe_precision(p, torch::kCPU));
}

void sample(benchmark::State& state, mdd::Precision p) {
  mdd::DiT m = demo_dit();
  m->eval();
  const auto net = [m](const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& y) mutable {
    return m->forward(x, t, y);
  };
  mdd::Sampler s(net, mdd::SamplerOptions().batch_size(100).timestep_respacing("50").cfg_scale(2.0).null_class(10)
                          .guidance(mdd::CfgGuidance::kReference3Channels).latent_shape({1, 28, 28}).precision(p));
  const auto labels = torch::arange(100, torch::kLong).remainder(10);
  for (auto _ : state) benchmark::DoNotOptimize(s.sample(labels).data_ptr());
  state.SetLabel(mdd::describe_precision(p, torch::kCPU));
}

void dc_eval(benchmark::State& state) {
  auto g = at::detail::createCPUGenerator(3);
  mdd::LabeledImages train{torch::randint(0, 256, {100, 28, 28, 1}, g, torch::kLong).to(torch::kUInt8),
                           torch::arange(100, torch::kLong).remainder(10), {}};
  mdd::LabeledImages test{torch::randint(0, 256, {10000, 28, 28, 1}, g, torch::kLong).to(torch::kUInt8),
                          torch::randint(0, 10, {10000}, g, torch::kLong), {}};
  for (auto _ : state) benchmark::DoNotOptimize(mdd::evaluate(train, test, mdd::EvalOptions().protocol("dc")).mean);
  state.SetLabel("fp32 (the evaluator has no precision option)");
}

}  // namespace

int main(int argc, char** argv) {
  // As the bundled programs run (MDD_HOST_ALLOCATOR=default measures glibc's defaults instead).
  const auto alloc = mdd::tune_host_allocator();
  if (const char* v = std::getenv("MDD_BF16_DOT"); v != nullptr && std::string(v) == "0")
    mdd::detail::set_bf16_dot_attention(false);
  benchmark::AddCustomContext("bf16_dot_attention", mdd::detail::bf16_dot_attention_available() ? "available" : "no");
  benchmark::AddCustomContext("host_allocator", alloc.detail);
  using P = mdd::Precision;
  for (auto [name, p] : {std::pair<const char*, P>{"fp32", P::kFP32}, {"bf16", P::kBF16}}) {
    const std::string s(name);
    benchmark::RegisterBenchmark(("demo_forward_b200/" + s).c_str(), [p = p](benchmark::State& st) {
      forward(st, demo_dit(), 200, {1, 28, 28}, 10, p);
    })->Unit(benchmark::kMillisecond)->UseRealTime();
    benchmark::RegisterBenchmark(("demo_train_b64/" + s).c_str(), [p = p](benchmark::State& st) {
      train(st, demo_dit(), sbs_random_data(640, 28, 1, 10), 64, p);
    })->Unit(benchmark::kMillisecond)->UseRealTime();
    benchmark::RegisterBenchmark(("s2_forward_b8/" + s).c_str(), [p = p](benchmark::State& st) {
      forward(st, s2_dit(), 8, {4, 32, 32}, 1000, p);
    })->Unit(benchmark::kMillisecond)->UseRealTime();
    benchmark::RegisterBenchmark(("s2_train_b8/" + s).c_str(), [p = p](benchmark::State& st) {
      train(st, s2_dit(), sbs_random_data(64, 32, 4, 10), 8, p);
    })->Unit(benchmark::kMillisecond)->UseRealTime();
    benchmark::RegisterBenchmark(("demo_sample_100/" + s).c_str(), [p = p](benchmark::State& st) { sample(st, p); })
        ->Unit(benchmark::kMillisecond)->UseRealTime();
  }
  benchmark::RegisterBenchmark("dc_eval_100/fp32", dc_eval)->Unit(benchmark::kMillisecond)->UseRealTime();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
