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
void convnet3_grey_step(benchmark::State& state, const char* norm) {
  // The dc protocol's step (Fashion-MNIST, batch 256, 1 channel).
  torch::manual_seed(0);
  auto net = mdd::make_eval_net("convnet3", 10, 28, norm, 0, 1);
  auto* impl = mdd::as_eval_net(net);
  torch::optim::SGD opt(impl->parameters(), torch::optim::SGDOptions(0.01).momentum(0.9).weight_decay(5e-4));
  const int64_t batch = state.range(0);
  auto x = torch::randn({batch, 1, 28, 28});
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
void BM_ConvNet3_TrainStep28Grey(benchmark::State& s) { convnet3_grey_step(s, "instance"); }
// Same network without normalisation layers: how much of the step the instance norm costs.
void BM_ConvNet3_TrainStep28Grey_NoNorm(benchmark::State& s) { convnet3_grey_step(s, "none"); }

}  // namespace

BENCHMARK(BM_ConvNet6_TrainStep224)->Unit(benchmark::kMillisecond)->Iterations(2);
BENCHMARK(BM_ResNetAP10_TrainStep224)->Unit(benchmark::kMillisecond)->Iterations(2);
BENCHMARK(BM_ConvNet3_TrainStep28Grey)->Unit(benchmark::kMillisecond)->Iterations(5)->Arg(100)->Arg(256);
BENCHMARK(BM_ConvNet3_TrainStep28Grey_NoNorm)->Unit(benchmark::kMillisecond)->Iterations(5)->Arg(100);

BENCHMARK_MAIN();
