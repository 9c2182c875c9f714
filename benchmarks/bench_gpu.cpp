// GPU benchmarks of the paper's setting (scripts/gpu-check.sh runs them; without a CUDA device
// nothing is registered and the program says so): DiT-XL/2 forward and DiffFit forward+backward at
// batch 8, one CFG sampling call at 50 images (a 100-row forward), and the SD VAE decode at 256 px,
// each in fp32 (TF32 off), TF32 and bf16 autocast. Weights are random: speed does not depend on them.
#include <benchmark/benchmark.h>

#include <cstdio>

#include <torch/torch.h>

#include "mdd/diffusion/sampler.h"
#include "mdd/models/autoencoder_kl.h"
#include "mdd/models/difffit.h"
#include "mdd/models/dit.h"
#include "mdd/util/precision.h"

namespace {

enum Mode : int64_t { kFp32 = 0, kTf32 = 1, kBf16 = 2 };
const char* mode_name(int64_t m) { return m == kFp32 ? "fp32" : m == kTf32 ? "tf32" : "bf16-autocast"; }

struct ModeScope {
  explicit ModeScope(int64_t m)
      : tf32_(m == kTf32), guard_(torch::kCUDA, m == kBf16 ? mdd::Precision::kBF16 : mdd::Precision::kFP32) {
    at::globalContext().setAllowTF32CuBLAS(tf32_);
    at::globalContext().setAllowTF32CuDNN(tf32_);
  }
  bool tf32_;
  mdd::AutocastGuard guard_;
};

void sync() { torch::cuda::synchronize(); }

mdd::DiT& xl2() {
  static mdd::DiT m = [] {
    mdd::DiT d(mdd::dit_options("DiT-XL/2"));
    d->to(torch::kCUDA);
    d->eval();
    return d;
  }();
  return m;
}

void BM_DiT_XL2_Forward(benchmark::State& state) {
  const int64_t b = state.range(0), mode = state.range(1);
  torch::NoGradGuard ng;
  auto x = torch::randn({b, 4, 32, 32}, torch::kCUDA);
  auto t = torch::randint(0, 1000, {b}, torch::TensorOptions().dtype(torch::kLong).device(torch::kCUDA));
  auto y = torch::randint(0, 1000, {b}, torch::TensorOptions().dtype(torch::kLong).device(torch::kCUDA));
  ModeScope ms(mode);
  for (auto _ : state) {
    benchmark::DoNotOptimize(xl2()->forward(x, t, y).data_ptr());
    sync();
  }
  state.SetLabel(mode_name(mode));
  state.counters["images/s"] = benchmark::Counter(double(b), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_DiffFit_XL2_ForwardBackward(benchmark::State& state) {
  const int64_t b = state.range(0), mode = state.range(1);
  static mdd::DiT m = [] {
    mdd::DiT d(mdd::dit_options("DiT-XL/2"));
    mdd::apply_difffit(d);
    d->to(torch::kCUDA);
    d->eval();
    return d;
  }();
  auto x = torch::randn({b, 4, 32, 32}, torch::kCUDA);
  auto t = torch::randint(0, 1000, {b}, torch::TensorOptions().dtype(torch::kLong).device(torch::kCUDA));
  auto y = torch::randint(0, 1000, {b}, torch::TensorOptions().dtype(torch::kLong).device(torch::kCUDA));
  for (auto _ : state) {
    torch::Tensor loss;
    {
      ModeScope ms(mode);
      loss = m->forward(x, t, y).to(torch::kFloat32).pow(2).mean();
    }
    loss.backward();
    sync();
  }
  state.SetLabel(mode_name(mode));
  state.counters["images/s"] = benchmark::Counter(double(b), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_CfgSamplingCall_XL2(benchmark::State& state) {
  const int64_t n = state.range(0), mode = state.range(1);
  torch::NoGradGuard ng;
  const auto net = [](const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& y) { return xl2()->forward(x, t, y); };
  mdd::Sampler s(net, mdd::SamplerOptions().device(torch::kCUDA).cfg_scale(4.0).null_class(1000).precision(
                          mode == kBf16 ? mdd::Precision::kBF16 : mdd::Precision::kFP32));
  auto labels = torch::randint(0, 1000, {n}, torch::kLong);
  auto fn = s.guided_model(labels);
  auto x = torch::randn({n, 4, 32, 32}, torch::kCUDA);
  auto t = torch::full({n}, 500, torch::TensorOptions().dtype(torch::kLong).device(torch::kCUDA));
  at::globalContext().setAllowTF32CuBLAS(mode == kTf32);
  for (auto _ : state) {
    benchmark::DoNotOptimize(fn(x, t).data_ptr());
    sync();
  }
  at::globalContext().setAllowTF32CuBLAS(false);
  state.SetLabel(mode_name(mode));
}

void BM_VaeDecode256(benchmark::State& state) {
  const int64_t b = state.range(0), mode = state.range(1);
  static mdd::AutoencoderKL vae = [] {
    mdd::AutoencoderKL v;
    v->eval();
    return v;
  }();
  vae->runtime.dtype(mode == kBf16 ? torch::kBFloat16 : torch::kFloat32).slice_size(0);
  vae->place(torch::kCUDA);
  at::globalContext().setAllowTF32CuDNN(mode == kTf32);
  at::globalContext().setAllowTF32CuBLAS(mode == kTf32);
  torch::NoGradGuard ng;
  auto z = torch::randn({b, 4, 32, 32}, torch::kCUDA);
  for (auto _ : state) {
    benchmark::DoNotOptimize(vae->decode(z).data_ptr());
    sync();
  }
  state.SetLabel(mode_name(mode));
}

void modes(benchmark::internal::Benchmark* b, int64_t batch) {
  b->ArgNames({"batch", "mode"})->Unit(benchmark::kMillisecond)->UseRealTime();
  for (int64_t m : {kFp32, kTf32, kBf16}) b->Args({batch, m});
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (!torch::cuda::is_available()) {
    std::fprintf(stderr, "bench_gpu: no CUDA device; nothing to measure\n");
    return 0;
  }
  benchmark::RegisterBenchmark("DiT_XL2_Forward", BM_DiT_XL2_Forward)->Apply([](auto* b) { modes(b, 8); });
  benchmark::RegisterBenchmark("DiffFit_XL2_ForwardBackward", BM_DiffFit_XL2_ForwardBackward)->Apply([](auto* b) { modes(b, 8); });
  benchmark::RegisterBenchmark("CfgSamplingCall_XL2", BM_CfgSamplingCall_XL2)->Apply([](auto* b) { modes(b, 50); });
  benchmark::RegisterBenchmark("VaeDecode256", BM_VaeDecode256)->Apply([](auto* b) { modes(b, 8); });
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
