// mdd_pretrain: train a class-conditional DiT from scratch on the config's data (for domains with
// no released DiT, e.g. Fashion-MNIST). Resumes from <output_dir>/pretrain/checkpoints.
//
//   mdd_pretrain -c configs/fashion-mnist.json --set model.checkpoint= --copy-to my-latent-dit.safetensors
#include <cstdio>
#include <filesystem>

#include "common/pipeline_cli.h"

int main(int argc, char** argv) {
  CLI::App app{"Pre-train a class-conditional DiT from scratch"};
  mdd_examples::PipelineCli cli;
  cli.add_options(app);
  bool force = false;
  std::string copy_to;
  app.add_flag("--force", force, "start over even when a finished pre-training exists (checkpoints are discarded)");
  app.add_option("--copy-to", copy_to, "also copy the resulting weights here");
  CLI11_PARSE(app, argc, argv);
  if (int rc = 0; cli.launch(argv, "mdd_pretrain", &rc)) return rc;
  try {
    mdd::DistillConfig config = cli.load();
    const std::string cfg = cli.write_resolved(config, "pretrain");
    auto cb = cli.callbacks();
    mdd::PipelineData data = mdd::load_pipeline_data(config, cb);
    const std::string out = mdd::run_pretrain(config, data, force, cb, cli.group);
    if (!cli.is_main()) return 0;
    if (!copy_to.empty()) {
      std::filesystem::copy_file(out, copy_to, std::filesystem::copy_options::overwrite_existing);
      std::fprintf(stderr, "copied to %s\n", copy_to.c_str());
    }
    std::printf("pre-trained weights: %s\nresolved config: %s\n", out.c_str(), cfg.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mdd_pretrain%s: error: %s\n", cli.rank_tag().c_str(), e.what());
    return 1;
  }
  return 0;
}
