// mdd_proxy: score generated Fashion-MNIST sets with the generator proxy (class faithfulness and a
// Fréchet distance on the features of a ConvNet-3 trained once on the whole real training set).
//
//   mdd_proxy --classifier runs/proxy-convnet3.safetensors samples_a.safetensors samples_b.safetensors
//
// Inputs are `samples.safetensors` files as `mdd_sample` / `mdd_distill` write them ("images" uint8
// [N, H, W, C], "labels" int64 [N]). The classifier file is trained and written when it does not
// exist yet (about 5 minutes on 2 cores) and reused afterwards.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "common/cli_progress.h"
#include "common/host_setup.h"
#include "mdd/data/fashion_mnist.h"
#include "mdd/eval/proxy.h"
#include "mdd/io/safetensors.h"
#include "mdd/util/error.h"
#include "mdd/util/threads.h"

int main(int argc, char** argv) {
  CLI::App app{"Score generated Fashion-MNIST sets with the generator proxy"};
  std::string fmnist_dir = "/usr/share/datasets/fashion-mnist", classifier, report;
  std::vector<std::string> samples;
  int64_t threads = 2;
  uint64_t seed = 0;
  app.add_option("samples", samples, "samples.safetensors files (images uint8 [N,H,W,C], labels [N])")->required();
  app.add_option("--classifier", classifier, "proxy classifier file (trained and written when missing)")->required();
  app.add_option("--fmnist-dir", fmnist_dir, "Fashion-MNIST directory")->capture_default_str();
  app.add_option("--seed", seed, "classifier seed (when training it)")->capture_default_str();
  app.add_option("--threads", threads, "torch intra-op threads")->capture_default_str();
  app.add_option("--report", report, "append one JSON line per scored file here");
  CLI11_PARSE(app, argc, argv);
  mdd_examples::tune_host_allocator();
  try {
    mdd::set_num_threads(static_cast<int>(threads));
    const auto train = mdd::load_fashion_mnist(fmnist_dir, "train");
    const auto test = mdd::load_fashion_mnist(fmnist_dir, "test");
    std::unique_ptr<mdd::GeneratorProxy> proxy;
    if (std::filesystem::exists(classifier)) {
      proxy = std::make_unique<mdd::GeneratorProxy>(mdd::GeneratorProxy::load(classifier, train, test));
    } else {
      mdd_examples::ProgressPrinter bar;
      std::fprintf(stderr, "training the proxy classifier on %lld images -> %s\n",
                   static_cast<long long>(train.images.size(0)), classifier.c_str());
      proxy = std::make_unique<mdd::GeneratorProxy>(train, test, mdd::ProxyOptions().seed(seed), bar.callback());
      bar.interrupt();
      proxy->save(classifier);
    }
    std::printf("%-60s %6s %8s %9s %9s  per-class %%\n", "samples", "n", "class%", "FD", "FD-floor");
    for (const auto& path : samples) {
      auto st = mdd::io::load_safetensors(path);
      if (!st.tensors.count("images") || !st.tensors.count("labels"))
        throw mdd::Error(path + ": needs tensors 'images' and 'labels' (a samples.safetensors file)");
      mdd::LabeledImages gen{st.tensors.at("images"), st.tensors.at("labels"), {}};
      const auto s = proxy->score(gen);
      std::string per;
      for (double v : s.per_class) per += std::isnan(v) ? "  -" : " " + std::to_string(int(std::lround(v)));
      std::printf("%-60s %6lld %8.2f %9.2f %9.2f %s\n", path.c_str(), static_cast<long long>(s.images),
                  s.class_accuracy, s.frechet, s.frechet_real_floor, per.c_str());
      if (!report.empty()) {
        nlohmann::json j = {{"samples", path},         {"images", s.images},
                            {"class_accuracy", s.class_accuracy}, {"per_class", s.per_class},
                            {"frechet", s.frechet},     {"frechet_real_floor", s.frechet_real_floor},
                            {"real_test_accuracy", s.real_test_accuracy}};
        std::ofstream(report, std::ios::app) << j.dump() << "\n";
      }
    }
    std::printf("(classifier accuracy on the real test set: %.2f %%)\n", proxy->real_test_accuracy());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mdd_proxy: %s\n", e.what());
    return 1;
  }
  return 0;
}
