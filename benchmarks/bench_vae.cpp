// Google Benchmark: the Stable Diffusion VAE (default sd-vae-ft-* architecture, random weights).
//   BM_VaeEncode256 / BM_VaeDecode256: one 256 px image (latent 4x32x32), images/s.
//   BM_VaeDecode64Latent/{untiled,tiled}: one 64x64 latent (512 px image); reports the peak
//   resident memory of that decode (VmHWM after resetting it via /proc/self/clear_refs) minus the
//   resident memory before it, i.e. the activations' footprint, plus images/s.
// On CPU the full-size VAE is slow: iterations are fixed and few. On a CUDA build pass
// --device=cuda to time the GPU (peak memory counters then describe host memory only).
#include <benchmark/benchmark.h>

#include <fstream>
#include <string>

#include <torch/torch.h>

#include "mdd/models/autoencoder_kl.h"

namespace {

torch::Device g_device = torch::kCPU;

mdd::AutoencoderKL& shared_vae() {
  static mdd::AutoencoderKL vae = [] {
    torch::manual_seed(0);
    mdd::AutoencoderKL v;  // 83.6 M parameters, PyTorch default init
    v->eval();
    v->place(g_device);
    return v;
  }();
  return vae;
}

// kB value of a /proc/self/status field (VmRSS, VmHWM), or -1.
double status_kb(const std::string& field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(field + ":", 0) == 0) return std::stod(line.substr(field.size() + 1));
  return -1;
}

// Resets the peak-RSS watermark to the current RSS (Linux >= 4.0); false if unsupported.
bool reset_peak_rss() {
  std::ofstream out("/proc/self/clear_refs");
  out << "5";
  return static_cast<bool>(out.flush());
}

void sync() {
  if (g_device.is_cuda()) torch::cuda::synchronize();
}

void BM_VaeEncode256(benchmark::State& state) {
  auto& vae = shared_vae();
  torch::NoGradGuard no_grad;
  const torch::Tensor x = (torch::rand({1, 3, 256, 256}) * 2 - 1).to(g_device);
  vae->encode(x);  // warm-up (allocator, kernel selection)
  for (auto _ : state) {
    benchmark::DoNotOptimize(vae->encode(x).mean);
    sync();
  }
  state.counters["images/s"] = benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_VaeEncode256)->Unit(benchmark::kMillisecond)->Iterations(3)->UseRealTime();

void BM_VaeDecode256(benchmark::State& state) {
  auto& vae = shared_vae();
  torch::NoGradGuard no_grad;
  const torch::Tensor z = torch::randn({1, 4, 32, 32}).to(g_device);
  vae->decode(z);
  for (auto _ : state) {
    benchmark::DoNotOptimize(vae->decode(z));
    sync();
  }
  state.counters["images/s"] = benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_VaeDecode256)->Unit(benchmark::kMillisecond)->Iterations(3)->UseRealTime();

// state.range(0): 0 = untiled, 1 = tiled (diffusers defaults: tile 32 latent px, overlap 8).
void BM_VaeDecode64Latent(benchmark::State& state) {
  auto& vae = shared_vae();
  torch::NoGradGuard no_grad;
  const torch::Tensor z = torch::randn({1, 4, 64, 64}).to(g_device);
  vae->runtime.tiling(state.range(0) == 1).tile_latent_size(32).tile_overlap(8);
  double peak_delta_mib = -1, rss_before_mib = -1;
  for (auto _ : state) {
    const bool can_reset = reset_peak_rss();
    const double before = status_kb("VmRSS");
    torch::Tensor img = vae->decode(z);
    sync();
    benchmark::DoNotOptimize(img);
    if (can_reset) peak_delta_mib = std::max(peak_delta_mib, (status_kb("VmHWM") - before) / 1024.0);
    rss_before_mib = before / 1024.0;
  }
  vae->runtime.tiling(false);
  state.counters["images/s"] = benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["peak_extra_MiB"] = peak_delta_mib;
  state.counters["rss_before_MiB"] = rss_before_mib;
  state.SetLabel(state.range(0) == 1 ? "tiled 32/8" : "untiled");
}
BENCHMARK(BM_VaeDecode64Latent)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->Iterations(1)->UseRealTime();

}  // namespace

int main(int argc, char** argv) {
  // Our own flag first, the rest goes to Google Benchmark.
  std::vector<char*> rest;
  for (int i = 0; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--device=cuda") {
      g_device = torch::kCUDA;
    } else {
      rest.push_back(argv[i]);
    }
  }
  int n = static_cast<int>(rest.size());
  benchmark::Initialize(&n, rest.data());
  if (benchmark::ReportUnrecognizedArguments(n, rest.data())) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
