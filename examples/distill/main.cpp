// mdd_distill: the whole pipeline from one JSON config — (pre-train) → fine-tune (DiffFit, with and
// without minimax) → sample IPC images per class → evaluate → report.
//
//   mdd_distill                                   # configs/fashion-mnist.json, CPU
//   mdd_distill -c configs/imagewoof-ipc10.json --device cuda --set model.checkpoint=DiT-XL-2-256x256.pt
//
// Re-running reuses finished stages; an interrupted fine-tune resumes from its last checkpoint.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include "common/pipeline_cli.h"
#include "mdd/util/error.h"

int main(int argc, char** argv) {
  CLI::App app{"Distil a labelled image set with Minimax Diffusion (fine-tune, sample, evaluate)"};
  mdd_examples::PipelineCli cli;
  cli.add_options(app);
  mdd::DistillRunOptions run;
  app.add_flag("--pretrain", run.force_pretrain, "pre-train the DiT from scratch even if model.checkpoint is set (and first train the VAE when vae.steps > 0)");
  app.add_flag("--no-eval", run.skip_evaluate, "stop after sampling (no evaluation table)");
  CLI11_PARSE(app, argc, argv);
  if (int rc = 0; cli.launch(argv, "mdd_distill", &rc)) return rc;
  try {
    mdd::DistillConfig config = cli.load();
    if (cli.is_main())
      std::fprintf(stderr, "mdd_distill: %s -> %s (device %s, %d threads)\n", cli.config_path.c_str(), config.output_dir.c_str(),
                   config.device.c_str(), torch::get_num_threads());
    run.process_group = cli.group;
    const std::string report = mdd::run_distill(config, run, cli.callbacks());
    if (!cli.is_main()) return 0;
    const std::string dir = std::filesystem::path(report).parent_path().string();
    std::ifstream md(dir + "/report.md");
    std::stringstream ss;
    ss << md.rdbuf();
    std::cout << "\n" << ss.str() << "\n";
    std::cout << "outputs: " << dir << "/{report.json, report.md, contact_sheet.png, samples/<class>/<k>.png, config.json}\n";
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mdd_distill%s: error: %s\n", cli.rank_tag().c_str(), e.what());
    return 1;
  }
  return 0;
}
