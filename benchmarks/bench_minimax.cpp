// Google Benchmark: the fused minimax loss (forward + backward) against the plain ATen
// composition of the reference (per class: normalise, matmul, min/max, autograd).
//   paper size: batch 8, 10 classes, latent 4x32x32, banks of 64 per class (full)
//   at scale:   batch 256, banks of 256 and of 1024
// Run with --benchmark_repetitions=5 --benchmark_enable_random_interleaving=true and compare medians.
#include <benchmark/benchmark.h>

#include <set>

#include <torch/torch.h>

#include "mdd/minimax/memory_bank.h"
#include "mdd/minimax/minimax_loss.h"

namespace {

constexpr int64_t kClasses = 10;
constexpr double kLr = 0.002, kLd = 0.008;

struct Setup {
  mdd::MemoryBank real, gen;
  torch::Tensor pred, labels;
  Setup(int64_t batch, int64_t bank, torch::Device dev) : real(kClasses, bank), gen(kClasses, bank) {
    auto g = at::detail::createCPUGenerator(0);
    for (int64_t c = 0; c < kClasses; ++c) {
      auto lab = torch::full({bank}, c, torch::kLong).to(dev);
      real.push(torch::randn({bank, 4, 32, 32}, g).to(dev), lab);
      gen.push(torch::randn({bank, 4, 32, 32}, g).to(dev), lab);
    }
    pred = torch::randn({batch, 4, 32, 32}, g).to(dev).requires_grad_(true);
    labels = (torch::arange(batch, torch::kLong) % kClasses).to(dev);
  }
};

// The reference algorithm (train_dit.py:250-280) as plain differentiable ATen ops.
torch::Tensor plain_total(const Setup& s) {
  auto lab = s.labels.to(torch::kCPU);
  std::set<int64_t> classes;
  const int64_t* lp = lab.data_ptr<int64_t>();
  for (int64_t i = 0; i < lab.size(0); ++i) classes.insert(lp[i]);
  const double n = static_cast<double>(classes.size());
  torch::Tensor pos = torch::zeros({}, s.pred.options().requires_grad(false)), neg = pos;
  for (int64_t c : classes) {
    if (s.gen.size(c) == 0) continue;
    auto P = s.pred.index_select(0, torch::nonzero(s.labels == c).flatten()).flatten(1);
    auto M = s.real.get(c).flatten(1);
    auto G = s.gen.get(c).flatten(1);
    auto Pn = P / P.norm(2, {1}, true);
    pos = pos + (1 - Pn.mm((M / M.norm(2, {1}, true)).t()).min()) * kLr / n;
    neg = neg + Pn.mm((G / G.norm(2, {1}, true)).t()).max() * kLd / n;
  }
  return pos + neg;
}

void sync(const torch::Device& dev) {
  if (dev.is_cuda()) torch::cuda::synchronize(dev.index());
}

void BM_Fused(benchmark::State& state, torch::Device dev) {
  Setup s(state.range(0), state.range(1), dev);
  for (auto _ : state) {
    auto t = mdd::minimax_loss(s.pred, s.labels, s.real, s.gen);
    auto g = torch::autograd::grad({t.total}, {s.pred});
    benchmark::DoNotOptimize(g[0].data_ptr());
    sync(dev);
  }
}

void BM_Plain(benchmark::State& state, torch::Device dev) {
  Setup s(state.range(0), state.range(1), dev);
  for (auto _ : state) {
    auto total = plain_total(s);
    auto g = torch::autograd::grad({total}, {s.pred});
    benchmark::DoNotOptimize(g[0].data_ptr());
    sync(dev);
  }
}

void sizes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"batch", "bank"})->Args({8, 64})->Args({256, 256})->Args({256, 1024})->Unit(benchmark::kMicrosecond);
  b->UseRealTime();
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::RegisterBenchmark("minimax_fwd_bwd/fused/cpu", BM_Fused, torch::Device(torch::kCPU))->Apply(sizes);
  benchmark::RegisterBenchmark("minimax_fwd_bwd/plain/cpu", BM_Plain, torch::Device(torch::kCPU))->Apply(sizes);
  if (torch::cuda::is_available()) {
    benchmark::RegisterBenchmark("minimax_fwd_bwd/fused/cuda", BM_Fused, torch::Device(torch::kCUDA, 0))->Apply(sizes);
    benchmark::RegisterBenchmark("minimax_fwd_bwd/plain/cuda", BM_Plain, torch::Device(torch::kCUDA, 0))->Apply(sizes);
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
