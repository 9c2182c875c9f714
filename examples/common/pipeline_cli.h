#pragma once
// Shared front-end of the pipeline example programs (not part of the library): the common
// --config/--set/--output-dir/--device/--threads options, and callbacks that draw progress bars
// and print log and loss lines on stderr.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include "common/cli_progress.h"
#include "common/host_setup.h"
#include "common/launch.h"
#include "mdd/dist/process_group.h"
#include "mdd/pipeline/config.h"
#include "mdd/pipeline/distill.h"
#include "mdd/util/error.h"
#include "mdd/util/threads.h"

namespace mdd_examples {

struct PipelineCli {
  std::string config_path = "configs/fashion-mnist.json";
  std::vector<std::string> overrides;
  std::string output_dir, device;
  int64_t threads = -1;
  int nproc = 1;
  /// This process's group (a single process unless launched as one of several ranks).
  mdd::dist::ProcessGroup group;
  std::unique_ptr<ProgressPrinter> printer = std::make_unique<ProgressPrinter>();

  /// Rank 0 (or a single process): the one that prints progress and results.
  bool is_main() const { return group.is_main(); }
  /// " (rank r of W)" for messages of a multi-process run, "" otherwise.
  std::string rank_tag() const {
    if (group.world_size() > 1) return " (rank " + std::to_string(group.rank()) + " of " + std::to_string(group.world_size()) + ")";
    const char* r = std::getenv("RANK");
    return r ? std::string(" (rank ") + r + ")" : std::string();
  }

  /// With `--nproc N` > 1 (and no launcher around) runs N ranks of this program and returns true
  /// with their exit code in `rc`; the caller returns it. Otherwise false: carry on.
  bool launch(char** argv, const char* program, int* rc) const {
    if (nproc <= 1 || launched_as_rank()) return false;
    *rc = launch_local_ranks(nproc, argv, program);
    return true;
  }

  void add_options(CLI::App& app) {
    app.add_option("-c,--config", config_path, "pipeline config (JSON)")->capture_default_str();
    app.add_option("--set", overrides, "override a config value, e.g. --set finetune.steps=500 (repeatable)");
    app.add_option("-o,--output-dir", output_dir, "override output_dir");
    app.add_option("--device", device, "override device (cpu, cuda, cuda:1)");
    app.add_option("--threads", threads,
                   "torch intra-op threads per process (default: config 'threads', else the cores shared among the "
                   "local ranks)");
    app.add_option("--nproc", nproc,
                   "run N local processes (data-parallel training, shared sampling and evaluation; 1 = this process "
                   "alone). Under torchrun/srun leave it at 1: their RANK/WORLD_SIZE are used")
        ->check(CLI::Range(1, 1024));
  }

  /// Joins the launcher's group (if any), then loads the config with the overrides.
  mdd::DistillConfig load() {
    if (nproc > 1 && launched_as_rank() && !std::getenv("LOCAL_WORLD_SIZE"))
      throw mdd::Error("--nproc is for starting ranks here; under torchrun or srun leave it at 1");
    group = mdd::dist::ProcessGroup(mdd::dist::DistOptions::from_env());
    if (!is_main()) printer.reset();  // rank 0 draws progress, the others stay quiet
    if (is_main()) tune_host_allocator(); else mdd::tune_host_allocator();
    mdd::DistillConfig c = mdd::load_config(config_path);
    for (const auto& o : overrides) mdd::apply_override(c, o);
    if (!output_dir.empty()) mdd::apply_override(c, "output_dir=\"" + output_dir + "\"");
    if (!device.empty()) mdd::apply_override(c, "device=\"" + device + "\"");
    if (threads >= 0) c.threads = threads;
    if (c.threads <= 0 && group.world_size() > 1) c.threads = threads_per_local_rank();
    if (c.threads > 0) mdd::set_num_threads(int(c.threads));  // the BLAS pool too
    if (group.world_size() > 1 && is_main())
      std::fprintf(stderr, "%d processes (rank 0 of %lld here), %d threads each\n", int(group.world_size()),
                   (long long)group.world_size(), torch::get_num_threads());
    return c;
  }

  // Writes the resolved config beside the outputs (<output_dir>/config.<program>.json); rank 0 only.
  std::string write_resolved(const mdd::DistillConfig& c, const std::string& program) const {
    const std::string p = (std::filesystem::path(c.output_dir) / ("config." + program + ".json")).string();
    if (!is_main()) return p;
    std::filesystem::create_directories(c.output_dir);
    std::ofstream(p) << mdd::config_to_json(c) << "\n";
    return p;
  }

  mdd::PipelineCallbacks callbacks() {
    mdd::PipelineCallbacks cb;
    if (!is_main()) return cb;  // only rank 0 reports
    cb.progress = printer->callback();
    ProgressPrinter* pr = printer.get();
    cb.log = [pr](const std::string& line) {
      pr->interrupt();
      std::fprintf(stderr, "%s\n", line.c_str());
      std::fflush(stderr);
    };
    cb.train_log = [pr](const mdd::TrainStats& s) {
      pr->interrupt();
      std::fprintf(stderr, "  step %lld/%lld  loss %.5f (mean %.5f)  diffusion %.5f  R %.4f  D %.4f  %.1f img/s%s\n",
                   (long long)s.step, (long long)s.total, s.loss, s.mean_loss, s.diffusion, s.representativeness,
                   s.diversity, s.images_per_s,
                   s.window_s > 0 && s.communication_s > 0
                       ? (" communication " + std::to_string(int(100.0 * s.communication_s / s.window_s + 0.5)) + " %").c_str()
                       : "");
      std::fflush(stderr);
    };
    return cb;
  }
};

}  // namespace mdd_examples
