// Training-step throughput of the evaluation networks at the protocol size (224 px, batch 64):
// forward + cross-entropy + backward + SGD step. Slow on CPU: few iterations.
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include "mdd/models/eval_nets.h"

namespace {

void train_step(benchmark::State& state, const char* name, int64_t size, int64_t batch) {
  torch::manual_seed(0);
  auto net = mdd::make_eval_net(name, 10, size);
  auto* impl = mdd::as_eval_net(net);
  impl->train();
  torch::optim::SGD opt(impl->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9).weight_decay(5e-4));
  auto x = torch::randn({batch, 3, size, size});
  auto y = torch::randint(10, {batch}, torch::kLong);
  for (auto _ : state) {
    auto loss = torch::nn::functional::cross_entropy(impl->forward(x), y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    benchmark::DoNotOptimize(loss.item<float>());
  }
  state.counters["images/s"] = benchmark::Counter(static_cast<double>(batch), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_ConvNet6_TrainStep224(benchmark::State& s) { train_step(s, "convnet6", 224, 64); }
void BM_ResNetAP10_TrainStep224(benchmark::State& s) { train_step(s, "resnet_ap10", 224, 64); }
void convnet3_grey_step(benchmark::State& state, const char* norm, bool fused) {
  // The dc protocol's step (Fashion-MNIST: 1 channel, 28 px; a 100-image set is one batch).
  // Args: batch, intra-op threads. Fused and module paths run side by side for the ratio.
  const int saved_threads = torch::get_num_threads();
  torch::set_num_threads(static_cast<int>(state.range(1)));
  torch::manual_seed(0);
  mdd::ConvNet net(mdd::ConvNetOptions(10, 3).in_channels(1).image_size(28).norm(norm).fused(fused));
  torch::optim::SGD opt(net->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9).weight_decay(5e-4));
  const int64_t batch = state.range(0);
  auto x = torch::randn({batch, 1, 28, 28});
  auto y = torch::randint(10, {batch}, torch::kLong);
  for (auto _ : state) {
    auto loss = torch::nn::functional::cross_entropy(net->forward(x), y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    benchmark::DoNotOptimize(loss.item<float>());
  }
  state.counters["images/s"] = benchmark::Counter(static_cast<double>(batch), benchmark::Counter::kIsIterationInvariantRate);
  torch::set_num_threads(saved_threads);
}
void BM_ConvNet3_TrainStep28Grey_Fused(benchmark::State& s) { convnet3_grey_step(s, "instance", true); }
void BM_ConvNet3_TrainStep28Grey_Modules(benchmark::State& s) { convnet3_grey_step(s, "instance", false); }
// Same network without normalisation layers: how much of the step the instance norm costs.
void BM_ConvNet3_TrainStep28Grey_NoNorm_Fused(benchmark::State& s) { convnet3_grey_step(s, "none", true); }

/// Test-set inference of the dc protocol: 10k images in batches of 500, no grad.
void convnet3_grey_test(benchmark::State& state, bool fused) {
  const int saved_threads = torch::get_num_threads();
  torch::set_num_threads(static_cast<int>(state.range(0)));
  torch::manual_seed(0);
  mdd::ConvNet net(mdd::ConvNetOptions(10, 3).in_channels(1).image_size(28).fused(fused));
  net->eval();
  auto x = torch::randn({500, 1, 28, 28});
  for (auto _ : state) {
    torch::NoGradGuard no_grad;
    benchmark::DoNotOptimize(net->forward(x).argmax(1).sum().item<int64_t>());
  }
  state.counters["images/s"] = benchmark::Counter(500.0, benchmark::Counter::kIsIterationInvariantRate);
  torch::set_num_threads(saved_threads);
}
void BM_ConvNet3_Test28Grey_Fused(benchmark::State& s) { convnet3_grey_test(s, true); }
void BM_ConvNet3_Test28Grey_Modules(benchmark::State& s) { convnet3_grey_test(s, false); }

}  // namespace

BENCHMARK(BM_ConvNet6_TrainStep224)->Unit(benchmark::kMillisecond)->Iterations(2);
BENCHMARK(BM_ResNetAP10_TrainStep224)->Unit(benchmark::kMillisecond)->Iterations(2);
BENCHMARK(BM_ConvNet3_TrainStep28Grey_Fused)->Unit(benchmark::kMillisecond)->Iterations(10)->Args({100, 1})->Args({100, 2})->Args({256, 2});
BENCHMARK(BM_ConvNet3_TrainStep28Grey_Modules)->Unit(benchmark::kMillisecond)->Iterations(10)->Args({100, 1})->Args({100, 2})->Args({256, 2});
BENCHMARK(BM_ConvNet3_TrainStep28Grey_NoNorm_Fused)->Unit(benchmark::kMillisecond)->Iterations(10)->Args({100, 2});
BENCHMARK(BM_ConvNet3_Test28Grey_Fused)->Unit(benchmark::kMillisecond)->Iterations(5)->Arg(2);
BENCHMARK(BM_ConvNet3_Test28Grey_Modules)->Unit(benchmark::kMillisecond)->Iterations(5)->Arg(2);

BENCHMARK_MAIN();
