// mdd_finetune: DiffFit fine-tuning of a pre-trained DiT, with the minimax criteria (default) or
// without (--variant difffit). Resumes from <output_dir>/<variant>/checkpoints.
//
//   mdd_finetune -c configs/imagewoof-ipc10.json --device cuda --init DiT-XL-2-256x256.pt
#include <cstdio>

#include "common/pipeline_cli.h"

int main(int argc, char** argv) {
  CLI::App app{"Fine-tune a DiT with DiffFit and the minimax criteria"};
  mdd_examples::PipelineCli cli;
  cli.add_options(app);
  std::string init, variant = "minimax";
  app.add_option("--init", init, "pre-trained weights (default: model.checkpoint)");
  app.add_option("--variant", variant, "minimax | difffit")->capture_default_str()->check(CLI::IsMember({"minimax", "difffit"}));
  CLI11_PARSE(app, argc, argv);
  if (int rc = 0; cli.launch(argv, "mdd_finetune", &rc)) return rc;
  try {
    mdd::DistillConfig config = cli.load();
    if (init.empty()) init = config.model.checkpoint;
    if (init.empty()) throw mdd::Error("no pre-trained weights: pass --init or set model.checkpoint (or run mdd_pretrain)");
    const std::string cfg = cli.write_resolved(config, "finetune-" + variant);
    auto cb = cli.callbacks();
    mdd::PipelineData data = mdd::load_pipeline_data(config, cb);
    const std::string out = mdd::run_finetune(config, data, init, variant, cb, cli.group);
    if (!cli.is_main()) return 0;
    std::printf("fine-tuned EMA weights: %s\nresolved config: %s\n", out.c_str(), cfg.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mdd_finetune%s: error: %s\n", cli.rank_tag().c_str(), e.what());
    return 1;
  }
  return 0;
}
