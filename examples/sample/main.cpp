// mdd_sample: IPC images per class from a (fine-tuned) DiT's EMA weights, written as
// <out>/<class>/<k>.png plus samples.safetensors and sample_config.json.
//
//   mdd_sample -c configs/fashion-mnist.json --weights runs/fashion-mnist/minimax/ema.safetensors --out my_samples
#include <cstdio>
#include <filesystem>

#include "common/pipeline_cli.h"

int main(int argc, char** argv) {
  CLI::App app{"Sample a distilled set from a DiT"};
  mdd_examples::PipelineCli cli;
  cli.add_options(app);
  std::string weights, out;
  app.add_option("--weights", weights, "DiT weights (default: <output_dir>/minimax/ema.safetensors)");
  app.add_option("--out", out, "output folder (default: <output_dir>/samples)");
  CLI11_PARSE(app, argc, argv);
  if (int rc = 0; cli.launch(argv, "mdd_sample", &rc)) return rc;
  try {
    mdd::DistillConfig config = cli.load();
    if (weights.empty()) weights = (std::filesystem::path(config.output_dir) / "minimax" / "ema.safetensors").string();
    if (out.empty()) out = (std::filesystem::path(config.output_dir) / "samples").string();
    const std::string cfg = cli.write_resolved(config, "sample");
    auto cb = cli.callbacks();
    mdd::PipelineData data = mdd::load_pipeline_data(config, cb);
    mdd::LabeledImages set = mdd::run_sample(config, data, weights, out, "sample", cb, cli.group);
    if (!cli.is_main()) return 0;
    std::printf("%lld images under %s (<class>/<k>.png, samples.safetensors)\nresolved config: %s\n",
                (long long)set.images.size(0), out.c_str(), cfg.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mdd_sample%s: error: %s\n", cli.rank_tag().c_str(), e.what());
    return 1;
  }
  return 0;
}
