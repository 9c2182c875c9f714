#pragma once
// Shared front-end of the pipeline example programs (not part of the library): the common
// --config/--set/--output-dir/--device/--threads options, and callbacks that draw progress bars
// and print log and loss lines on stderr.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include "common/cli_progress.h"
#include "common/host_setup.h"
#include "mdd/pipeline/config.h"
#include "mdd/pipeline/distill.h"
#include "mdd/util/error.h"

namespace mdd_examples {

struct PipelineCli {
  std::string config_path = "configs/fashion-mnist.json";
  std::vector<std::string> overrides;
  std::string output_dir, device;
  int64_t threads = -1;
  std::unique_ptr<ProgressPrinter> printer = std::make_unique<ProgressPrinter>();

  void add_options(CLI::App& app) {
    app.add_option("-c,--config", config_path, "pipeline config (JSON)")->capture_default_str();
    app.add_option("--set", overrides, "override a config value, e.g. --set finetune.steps=500 (repeatable)");
    app.add_option("-o,--output-dir", output_dir, "override output_dir");
    app.add_option("--device", device, "override device (cpu, cuda, cuda:1)");
    app.add_option("--threads", threads, "torch intra-op threads (default: config 'threads', 0 = LibTorch default)");
  }

  mdd::DistillConfig load() {
    tune_host_allocator();
    mdd::DistillConfig c = mdd::load_config(config_path);
    for (const auto& o : overrides) mdd::apply_override(c, o);
    if (!output_dir.empty()) mdd::apply_override(c, "output_dir=\"" + output_dir + "\"");
    if (!device.empty()) mdd::apply_override(c, "device=\"" + device + "\"");
    if (threads >= 0) c.threads = threads;
    if (c.threads > 0) torch::set_num_threads(int(c.threads));
    return c;
  }

  // Writes the resolved config beside the outputs (<output_dir>/config.<program>.json).
  static std::string write_resolved(const mdd::DistillConfig& c, const std::string& program) {
    std::filesystem::create_directories(c.output_dir);
    const std::string p = (std::filesystem::path(c.output_dir) / ("config." + program + ".json")).string();
    std::ofstream(p) << mdd::config_to_json(c) << "\n";
    return p;
  }

  mdd::PipelineCallbacks callbacks() {
    mdd::PipelineCallbacks cb;
    cb.progress = printer->callback();
    ProgressPrinter* pr = printer.get();
    cb.log = [pr](const std::string& line) {
      pr->interrupt();
      std::fprintf(stderr, "%s\n", line.c_str());
      std::fflush(stderr);
    };
    cb.train_log = [pr](const mdd::TrainStats& s) {
      pr->interrupt();
      std::fprintf(stderr, "  step %lld/%lld  loss %.5f (mean %.5f)  diffusion %.5f  R %.4f  D %.4f  %.1f img/s\n",
                   (long long)s.step, (long long)s.total, s.loss, s.mean_loss, s.diffusion, s.representativeness,
                   s.diversity, s.images_per_s);
      std::fflush(stderr);
    };
    return cb;
  }
};

}  // namespace mdd_examples
