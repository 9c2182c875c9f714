// mdd_train_vae: train a small AutoencoderKL on Fashion-MNIST (the latent codec of the CPU demo's
// latent-diffusion variant) and report its reconstruction quality.
//
//   mdd_train_vae --out runs/fmnist-vae --steps 4000 --channels 32,64,64 --latent 4
//   mdd_train_vae --out runs/ft --init models/fashion-mnist-vae --decoder-only --steps 6000
//
// The second form fine-tunes only the decoder of an existing VAE: its latents (and any DiT trained
// on them) stay valid, and its scaling factor is kept.
// Writes <out>/checkpoints/ (resumable: re-running continues), <out>/vae/ (a diffusers folder with
// the fitted scaling factor, usable as codec.encoder), <out>/report.json (PSNR on the test split,
// and with --proxy-classifier the accuracy of that classifier on the reconstructed test images).
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "common/cli_progress.h"
#include "common/host_setup.h"
#include "common/launch.h"
#include "mdd/dist/process_group.h"
#include "mdd/util/host_allocator.h"
#include "mdd/data/fashion_mnist.h"
#include "mdd/eval/proxy.h"
#include "mdd/io/image.h"
#include "mdd/train/vae_trainer.h"
#include "mdd/util/error.h"
#include "mdd/util/threads.h"

namespace {
// ", communication N s" of a report window (several ranks).
std::string fmt_comm(const mdd::VaeTrainStats& s) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), ", communication %.1f s", s.communication_s);
  return buf;
}
}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Train a small AutoencoderKL on Fashion-MNIST"};
  std::string fmnist_dir = "/usr/share/datasets/fashion-mnist", out, proxy_path, precision = "fp32", init;
  bool decoder_only = false;
  std::vector<int64_t> channels{32, 64, 64};
  int64_t latent = 4, layers = 1, groups = 8, threads = 2;
  mdd::VaeTrainerOptions o;
  int64_t steps = o.steps(), batch = o.batch_size(), warmup = o.lr_warmup();
  double lr = o.lr(), kl = o.kl_weight();
  std::string recon = o.reconstruction();
  uint64_t seed = 0;
  app.add_option("--out", out, "run folder (checkpoints/, vae/, report.json)")->required();
  app.add_option("--fmnist-dir", fmnist_dir, "Fashion-MNIST directory")->capture_default_str();
  auto* init_opt = app.add_option("--init", init, "start from this diffusers VAE folder (its architecture replaces --channels/--latent/--layers/--groups)");
  app.add_flag("--decoder-only", decoder_only, "train only decoder + post_quant_conv (latents and scaling factor unchanged); needs --init")
      ->needs(init_opt);
  app.add_option("--channels", channels, "block_out_channels (levels; downsampling 2^(levels-1))")->delimiter(',')->capture_default_str();
  app.add_option("--latent", latent, "latent channels")->capture_default_str();
  app.add_option("--layers", layers, "ResnetBlock2Ds per encoder level")->capture_default_str();
  app.add_option("--groups", groups, "GroupNorm groups (must divide every channel count)")->capture_default_str();
  app.add_option("--steps", steps, "optimiser steps")->capture_default_str();
  app.add_option("--batch-size", batch, "images per step")->capture_default_str();
  app.add_option("--lr", lr, "AdamW learning rate")->capture_default_str();
  app.add_option("--lr-warmup", warmup, "linear warm-up steps")->capture_default_str();
  app.add_option("--kl-weight", kl, "weight of the per-element KL term")->capture_default_str();
  app.add_option("--reconstruction", recon, "l1 | mse")->capture_default_str();
  app.add_option("--precision", precision, "fp32 | bf16 | auto")->capture_default_str();
  app.add_option("--seed", seed, "seed")->capture_default_str();
  app.add_option("--threads", threads, "torch intra-op threads")->capture_default_str();
  app.add_option("--proxy-classifier", proxy_path, "mdd_proxy classifier file: also report its accuracy on reconstructions");
  int nproc = 1;
  app.add_option("--nproc", nproc, "run N local processes training data-parallel (under torchrun/srun leave it at 1)")
      ->check(CLI::Range(1, 1024));
  CLI11_PARSE(app, argc, argv);
  if (nproc > 1 && !mdd_examples::launched_as_rank()) return mdd_examples::launch_local_ranks(nproc, argv, "mdd_train_vae");
  try {
    // Every rank trains its share of each batch; only rank 0 prints, measures and writes.
    mdd::dist::ProcessGroup group(mdd::dist::DistOptions::from_env());
    if (group.is_main()) mdd_examples::tune_host_allocator(); else mdd::tune_host_allocator();
    if (group.world_size() > 1 && app.count("--threads") == 0) threads = mdd_examples::threads_per_local_rank();
    mdd::set_num_threads(static_cast<int>(threads));
    namespace fs = std::filesystem;
    fs::create_directories(out);
    const auto train = mdd::load_fashion_mnist(fmnist_dir, "train");
    const auto test = mdd::load_fashion_mnist(fmnist_dir, "test");
    for (const char* flag : {"--channels", "--latent", "--layers", "--groups"})
      if (!init.empty() && app.count(flag) > 0)
        throw mdd::Error(std::string(flag) + " cannot be combined with --init (the VAE folder fixes the architecture)");
    torch::manual_seed(seed);  // PyTorch-default initialisation from a seeded global generator
    mdd::AutoencoderKL vae = init.empty()
        ? mdd::AutoencoderKL(mdd::AutoencoderKLOptions().in_channels(1).out_channels(1).latent_channels(latent)
                                 .block_out_channels(channels).layers_per_block(layers).norm_num_groups(groups)
                                 .sample_size(train.images.size(1)))
        : mdd::AutoencoderKL::from_pretrained(init);
    const double init_scaling = vae->options.scaling_factor();
    channels = vae->options.block_out_channels();
    latent = vae->options.latent_channels();
    o.train_encoder(!decoder_only).steps(steps).batch_size(batch).lr(lr).lr_warmup(warmup).kl_weight(kl).reconstruction(recon).seed(seed)
        .checkpoint_dir((fs::path(out) / "checkpoints").string()).precision(mdd::parse_precision(precision));
    o.process_group(group);
    const double psnr_init = init.empty() || !group.is_main() ? 0.0 : mdd::reconstruction_psnr(vae, test.images);
    if (!init.empty() && group.is_main()) std::fprintf(stderr, "train_vae: %s: test PSNR %.2f dB before training\n", init.c_str(), psnr_init);
    mdd::VaeTrainer trainer(vae, train, o);
    mdd_examples::ProgressPrinter bar;
    const mdd::LogFn log = [&](const std::string& line) {
      bar.interrupt();
      std::fprintf(stderr, "train_vae: %s\n", line.c_str());
    };
    const bool main_rank = group.is_main();
    if (trainer.resume(main_rank ? log : mdd::LogFn()) && main_rank)
      std::fprintf(stderr, "train_vae: resumed at step %lld\n", static_cast<long long>(trainer.step_count()));
    trainer.train(main_rank ? bar.callback() : mdd::ProgressFn(), [&](const mdd::VaeTrainStats& s) {
      if (!main_rank) return;
      bar.interrupt();
      std::fprintf(stderr, "step %lld/%lld loss %.5f (recon %.5f, kl %.3f) %.0f img/s%s\n", static_cast<long long>(s.step),
                   static_cast<long long>(s.total), s.mean_loss, s.reconstruction, s.kl, s.images_per_s,
                   group.world_size() > 1 ? fmt_comm(s).c_str() : "");
    });
    bar.interrupt();
    if (!main_rank) return 0;  // rank 0 measures and writes the result
    auto v = trainer.vae();
    // A frozen encoder keeps its latents, so the factor a DiT was trained with must stay as it was.
    v->options.scaling_factor(decoder_only ? init_scaling : mdd::fit_scaling_factor(v, train.images));
    torch::Tensor rec;
    const double psnr = mdd::reconstruction_psnr(v, test.images, &rec);
    nlohmann::json report = {{"steps", trainer.step_count()}, {"psnr_test_db", psnr},
                             {"scaling_factor", v->options.scaling_factor()},
                             {"parameters", [&] { int64_t n = 0; for (auto& p : v->parameters()) n += p.numel(); return n; }()},
                             {"block_out_channels", channels}, {"latent_channels", latent}, {"kl_weight", kl},
                             {"lr", lr}, {"batch_size", batch}, {"seed", std::to_string(seed)}, {"precision", precision},
                             {"init", init}, {"decoder_only", decoder_only}};
    if (!init.empty()) report["psnr_test_db_init"] = psnr_init;
    std::printf("VAE: %lld steps, test PSNR %.2f dB, scaling_factor %.4f\n", static_cast<long long>(trainer.step_count()),
                psnr, v->options.scaling_factor());
    if (!proxy_path.empty()) {
      auto proxy = mdd::GeneratorProxy::load(proxy_path, train, test);
      const auto s = proxy.score(mdd::LabeledImages{rec, test.labels, {}});
      report["proxy_accuracy_on_reconstructions"] = s.class_accuracy;
      report["proxy_accuracy_on_real_test"] = proxy.real_test_accuracy();
      report["proxy_frechet_reconstructions"] = s.frechet;
      std::printf("proxy classifier: %.2f %% on reconstructions vs %.2f %% on the real test images; FD %.2f\n",
                  s.class_accuracy, proxy.real_test_accuracy(), s.frechet);
    }
    mdd::save_pretrained(v, (fs::path(out) / "vae").string());
    std::vector<torch::Tensor> rows;
    for (int64_t c = 0; c < 10; ++c) {
      auto idx = (test.labels == c).nonzero().flatten().slice(0, 0, 10);
      rows.push_back(test.images.index_select(0, idx));
      rows.push_back(rec.index_select(0, idx));
    }
    mdd::write_png((fs::path(out) / "reconstructions.png").string(), mdd::contact_sheet(rows));
    std::ofstream(fs::path(out) / "report.json") << report.dump(2) << "\n";
  } catch (const std::exception& e) {
    std::fprintf(stderr, "mdd_train_vae: %s\n", e.what());
    return 1;
  }
  return 0;
}
