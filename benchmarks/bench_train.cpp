// One fine-tuning step (forward, loss, backward, AdamW, EMA, memory push) of the Fashion-MNIST DiT
// (the demo's model: 28 px, patch 4, width 96, depth 4, 1 channel) at the demo's batch of 32:
// DiffFit alone vs DiffFit + minimax (the cost of the minimax terms), and full pre-training steps.
// BM_PretrainShape compares fp32 with bf16 autocast side by side for generator shapes
// (args: batch, patch, width, depth, bf16); the label names the kernel path that ran.
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include "mdd/data/latent_cache.h"
#include "mdd/data/training_data.h"
#include "mdd/io/safetensors.h"
#include "mdd/models/codec.h"
#include "mdd/train/finetune.h"

namespace {

std::shared_ptr<mdd::LatentTrainingData> data() {
  static std::shared_ptr<mdd::LatentTrainingData> d = [] {
    auto gen = at::detail::createCPUGenerator(0);
    mdd::LabeledImages imgs;
    imgs.images = torch::randint(0, 256, {640, 28, 28, 1}, gen, torch::kInt64).to(torch::kUInt8);
    imgs.labels = torch::arange(640, torch::kInt64).remainder(10);
    mdd::IdentityCodec codec;
    auto path = std::string("/tmp/mdd_bench_train_latents.safetensors");
    return std::make_shared<mdd::LatentTrainingData>(mdd::LatentCache::build(path, codec, imgs), 10);
  }();
  return d;
}

mdd::DiT model(int64_t patch = 4, int64_t width = 96, int64_t depth = 4) {
  mdd::DiT m(mdd::DiTOptions(28, patch, 1, width, depth, 4).num_classes(10));
  auto gen = at::detail::createCPUGenerator(1);
  m->initialize_weights(gen);
  return m;
}

void run(benchmark::State& state, mdd::FinetuneOptions o, bool pretrain, mdd::DiT m = model()) {
  o.batch_size(state.range(0)).steps(1 << 30).log_every(0);
  std::unique_ptr<mdd::Finetuner> ft = pretrain ? std::make_unique<mdd::Pretrainer>(m, data(), o)
                                                : std::make_unique<mdd::Finetuner>(m, data(), o);
  state.SetLabel(mdd::describe_precision(ft->precision(), torch::kCPU));
  for (int i = 0; i < 3; ++i) ft->step();  // fill the memories, allocate the optimizer state
  for (auto _ : state) benchmark::DoNotOptimize(ft->step().loss);
  state.counters["images/s"] =
      benchmark::Counter(static_cast<double>(state.range(0)), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_FinetuneStep_DiffFit(benchmark::State& s) { run(s, mdd::FinetuneOptions().gamma_blocks(3).minimax(false), false); }
void BM_FinetuneStep_DiffFitMinimax(benchmark::State& s) { run(s, mdd::FinetuneOptions().gamma_blocks(3), false); }
void BM_PretrainStep(benchmark::State& s) { run(s, mdd::pretrain_defaults(), true); }
void BM_PretrainShape(benchmark::State& s) {
  const auto prec = s.range(4) ? mdd::Precision::kBF16 : mdd::Precision::kFP32;
  run(s, mdd::pretrain_defaults().precision(prec), true, model(s.range(1), s.range(2), s.range(3)));
}

}  // namespace

BENCHMARK(BM_FinetuneStep_DiffFit)->Unit(benchmark::kMillisecond)->Arg(32)->MinTime(3.0);
BENCHMARK(BM_FinetuneStep_DiffFitMinimax)->Unit(benchmark::kMillisecond)->Arg(32)->MinTime(3.0);
BENCHMARK(BM_PretrainStep)->Unit(benchmark::kMillisecond)->Arg(64)->MinTime(3.0);
// {batch, patch, width, depth, bf16}: the demo generator, then wider / finer candidates.
BENCHMARK(BM_PretrainShape)
    ->Unit(benchmark::kMillisecond)
    ->ArgNames({"batch", "patch", "width", "depth", "bf16"})
    ->Args({64, 4, 96, 4, 0})->Args({64, 4, 96, 4, 1})
    ->Args({64, 4, 256, 6, 0})->Args({64, 4, 256, 6, 1})
    ->Args({64, 2, 128, 6, 0})->Args({64, 2, 128, 6, 1})
    ->Args({64, 2, 256, 6, 0})->Args({64, 2, 256, 6, 1})
    ->MinTime(3.0);

BENCHMARK_MAIN();
