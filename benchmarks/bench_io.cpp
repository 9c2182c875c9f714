// Weight-file loading throughput: safetensors and torch.save checkpoints (MB/s via SetBytesProcessed).
//
// The files are created once under $TMPDIR/mdd_bench_io (256 MB each) and then sit in the page cache,
// so the numbers measure read(2) + parsing + validation, not the disk. MDD_BENCH_PT=<file> adds a
// benchmark of a real checkpoint (e.g. DiT-XL-2-256x256.pt).
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "io/zip_reader.h"
#include "mdd/io/safetensors.h"
#include "mdd/io/torch_checkpoint.h"

namespace {

namespace fs = std::filesystem;
constexpr int64_t kTensors = 64;
constexpr int64_t kFloatsPerTensor = 1 << 20;  // 4 MB each, 256 MB in all

std::string bench_dir() {
  const char* t = std::getenv("TMPDIR");
  fs::path d = fs::path(t && *t ? t : "/tmp") / "mdd_bench_io";
  fs::create_directories(d);
  return d.string();
}

const std::string& safetensors_file() {
  static const std::string path = [] {
    const std::string p = bench_dir() + "/weights_256mb.safetensors";
    if (!fs::exists(p) || fs::file_size(p) < uint64_t(kTensors * kFloatsPerTensor * 4)) {
      mdd::io::TensorMap m;
      torch::manual_seed(0);
      for (int64_t i = 0; i < kTensors; ++i) m["blocks." + std::to_string(i) + ".weight"] = torch::randn({1024, kFloatsPerTensor / 1024});
      mdd::io::save_safetensors(p, m);
    }
    return p;
  }();
  return path;
}

// torch.save needs Python's torch; without it the checkpoint benchmark is skipped.
const std::string& torch_file() {
  static const std::string path = [] {
    const std::string p = bench_dir() + "/weights_256mb.pt";
    if (!fs::exists(p)) {
      const std::string cmd =
          "/usr/bin/python3 -c \"import torch, collections; g = torch.Generator().manual_seed(0); "
          "torch.save(collections.OrderedDict(('blocks.%d.weight' % i, torch.randn(1024, 1024, generator=g)) for i in "
          "range(64)), '" + p + "')\" > /dev/null 2>&1";
      if (std::system(cmd.c_str()) != 0) return std::string();
    }
    return p;
  }();
  return path;
}

void BM_LoadSafetensors(benchmark::State& state) {
  const std::string& p = safetensors_file();
  const auto bytes = int64_t(fs::file_size(p));
  for (auto _ : state) {
    auto st = mdd::io::load_safetensors(p);
    benchmark::DoNotOptimize(st.tensors.begin()->second.data_ptr());
  }
  state.SetBytesProcessed(state.iterations() * bytes);
}
BENCHMARK(BM_LoadSafetensors)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_LoadTorchCheckpoint(benchmark::State& state) {
  const std::string& p = torch_file();
  if (p.empty()) {
    state.SkipWithError("python3 with torch is needed to create the .pt file");
    return;
  }
  const auto bytes = int64_t(fs::file_size(p));
  for (auto _ : state) {
    auto m = mdd::io::load_torch_checkpoint(p);
    benchmark::DoNotOptimize(m.begin()->second.data_ptr());
  }
  state.SetBytesProcessed(state.iterations() * bytes);
}
BENCHMARK(BM_LoadTorchCheckpoint)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_LoadWeightsEnv(benchmark::State& state) {
  const char* p = std::getenv("MDD_BENCH_PT");
  if (!p || !*p) {
    state.SkipWithError("set MDD_BENCH_PT=<checkpoint> to benchmark a real file");
    return;
  }
  const auto bytes = int64_t(fs::file_size(p));
  for (auto _ : state) {
    auto m = mdd::io::load_weights(p);
    benchmark::DoNotOptimize(m.size());
  }
  state.SetBytesProcessed(state.iterations() * bytes);
}
BENCHMARK(BM_LoadWeightsEnv)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(3);

// The CRC-32 check load_torch_checkpoint runs on every record it uses, alone.
void BM_Crc32(benchmark::State& state) {
  auto buf = torch::randint(0, 256, {int64_t(64) << 20}, torch::kByte);
  for (auto _ : state) benchmark::DoNotOptimize(mdd::io::detail::crc32_of(buf.data_ptr<uint8_t>(), uint64_t(buf.numel())));
  state.SetBytesProcessed(state.iterations() * buf.numel());
}
BENCHMARK(BM_Crc32)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
