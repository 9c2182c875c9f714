// mdd_evaluate: train fresh classifiers on a (distilled) image set and report test accuracy.
//
//   mdd_evaluate --train <distilled_root> --test <imagenet>/val --protocol idc --net resnet_ap10
//   mdd_evaluate --fashion-mnist --ipc 10 --select random --protocol dc --repeats 3
//   mdd_evaluate --fashion-mnist --train <distilled_fmnist> --protocol dc --repeats 3
//   mdd_evaluate --fashion-mnist --train <generated_fmnist> --ipc 10 --select first,herding --protocol dc
//
// Image folders are `<root>/<class>/*.png|jpg`; the test folder uses the training set's classes.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "common/cli_progress.h"
#include "common/host_setup.h"
#include "common/launch.h"
#include "mdd/dist/process_group.h"
#include "mdd/data/fashion_mnist.h"
#include "mdd/data/image_folder.h"
#include "mdd/eval/evaluator.h"
#include "mdd/eval/selection.h"
#include "mdd/pipeline/distill.h"
#include "mdd/util/error.h"
#include "mdd/util/threads.h"

int main(int argc, char** argv) {
  CLI::App app{"Evaluate a training set (e.g. a distilled one) by training fresh classifiers on it"};
  std::string train_dir, test_dir, fmnist_dir = "/usr/share/datasets/fashion-mnist", report, repeat_dir, select = "random";
  bool fashion = false;
  int64_t ipc = 0, feature_epochs = 5, threads = 2, load_size = 0, image_size = 0;
  mdd::EvalOptions o;
  std::string protocol = "idc", net, norm, device = "cpu";
  int64_t epochs = 0, repeats = 1, width = 0, batch = 0, eval_every = 0;
  uint64_t seed = 0;
  app.add_option("--train", train_dir, "training image folder <root>/<class>/*");
  app.add_option("--test", test_dir, "test image folder (same class names)");
  app.add_flag("--fashion-mnist", fashion,
               "use Fashion-MNIST: test split -> test; train split -> selection, or --train <folder> of 1-channel "
               "images in class folders named as mdd_distill writes them (T-shirt_top, Trouser, ...)");
  app.add_option("--fmnist-dir", fmnist_dir, "Fashion-MNIST directory")->capture_default_str();
  app.add_option("--ipc", ipc, "images per class taken from the training set (0 = all)");
  app.add_option("--select", select, "coreset: random | first | herding | kcenter, or a comma list (reports get a <method>_ prefix)")->capture_default_str();
  app.add_option("--feature-epochs", feature_epochs,
                 "herding/kcenter: epochs of the full-data network whose embeddings are used")->capture_default_str();
  std::string herding_target = "set";
  app.add_option("--herding-target", herding_target,
                 "herding toward each class's mean over the set it selects from (set) or over the real Fashion-MNIST "
                 "train split (real; e.g. to keep the generated candidates that best match the real data)")
      ->check(CLI::IsMember({"set", "real"}))->capture_default_str();
  app.add_option("--protocol", protocol, "idc | dc")->capture_default_str();
  std::string feature_protocol = "dc";
  app.add_option("--feature-protocol", feature_protocol,
                 "herding/kcenter: protocol the full-data feature network trains under (dc: ConvNet-3 at the "
                 "stored size, so a Herding set is the same whichever --protocol evaluates it; with --protocol "
                 "the same, --net/--norm/--width/--image-size apply to it too)")
      ->check(CLI::IsMember({"idc", "dc"}))->capture_default_str();
  app.add_option("--net", net, "convnet<d> | resnet_ap<d> | resnet<d> (default: protocol's)");
  app.add_option("--norm", norm, "instance | batch | none (default instance)");
  app.add_option("--width", width, "base width (0 = reference)");
  app.add_option("--epochs", epochs, "0 = protocol rule");
  app.add_option("--eval-every", eval_every, "epochs between tests (0 = protocol)");
  app.add_option("--batch-size", batch, "0 = protocol");
  app.add_option("--repeats", repeats, "training runs (seeds seed, seed+1, ...)")->capture_default_str();
  app.add_option("--seed", seed, "base seed")->capture_default_str();
  app.add_option("--size", load_size, "image folders: Resize+CenterCrop size at load (0 = idc: 224, dc: as stored)");
  app.add_option("--image-size", image_size,
                 "training/test size of the classifier (idc: RandomResizedCrop / Resize+CenterCrop to it; 0 = "
                 "protocol: idc 224, dc as stored); e.g. --fashion-mnist --protocol idc --net convnet3 --image-size 28 "
                 "runs the paper's recipe at Fashion-MNIST's own size")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--threads", threads, "torch intra-op threads")->capture_default_str();
  app.add_option("--device", device, "cpu | cuda:0 ...")->capture_default_str();
  app.add_option("--report", report, "write a JSON report here");
  app.add_option("--repeat-dir", repeat_dir,
                 "keep each finished repeat here and reuse those already there: a cut-short run resumes when started again");
  int nproc = 1;
  app.add_option("--nproc", nproc, "run N local processes that share the repeats (under torchrun/srun leave it at 1)")
      ->check(CLI::Range(1, 1024));
  CLI11_PARSE(app, argc, argv);
  if (nproc > 1 && !mdd_examples::launched_as_rank()) return mdd_examples::launch_local_ranks(nproc, argv, "mdd_evaluate");

  try {
    // The ranks share every set's repeats as one pool (evaluate_sets); only rank 0 prints and writes reports.
    mdd::dist::ProcessGroup group(mdd::dist::DistOptions::from_env());
    if (group.is_main()) mdd_examples::tune_host_allocator(); else mdd::tune_host_allocator();
    if (group.world_size() > 1 && app.count("--threads") == 0) threads = mdd_examples::threads_per_local_rank();
    mdd::set_num_threads(static_cast<int>(threads));
    o.protocol(protocol).net(net).norm(norm).width(width).epochs(epochs).eval_every(eval_every).batch_size(batch)
        .repeats(repeats).seed(seed).device(device).image_size(image_size);
    mdd_examples::ProgressPrinter printer;
    const mdd::ProgressFn progress = group.is_main() ? printer.callback() : mdd::ProgressFn();
    const auto t0 = std::chrono::steady_clock::now();
    mdd::LabeledImages train, test;
    nlohmann::json rep;
    torch::Tensor features;
    std::vector<std::string> methods;  // --select a,b: one feature network shared by all methods
    for (size_t b = 0, e; b <= select.size(); b = e + 1) {
      e = select.find(',', b);
      if (e == std::string::npos) e = select.size();
      if (e > b) methods.push_back(select.substr(b, e - b));
    }
    // DC's FashionMNIST statistics (utils.py get_dataset), for the train split and distilled folders alike.
    if (fashion) o.mean({0.2861}).std({0.3530});
    const bool needs_features =
        std::any_of(methods.begin(), methods.end(), [](const std::string& m) { return m == "herding" || m == "kcenter"; });
    if (herding_target == "real" && !fashion) throw mdd::Error("--herding-target real needs --fashion-mnist");
    mdd::LabeledImages real;  // the Fashion-MNIST train split, when a selection needs it
    torch::Tensor real_features;
    if (fashion && !train_dir.empty()) {
      // A distilled Fashion-MNIST set (e.g. mdd_distill's samples/<method>/): labels follow the
      // dataset's class order, not the folders' alphabetical one.
      if (!test_dir.empty()) throw mdd::Error("--fashion-mnist tests on its test split; drop --test");
      test = mdd::load_fashion_mnist(fmnist_dir, "test");
      std::vector<std::string> dirs;
      for (const auto& n : test.class_names) dirs.push_back(mdd::sanitize_class_dir(n));
      mdd::ImageFolder tr(train_dir, mdd::ImageFolderOptions().classes(dirs).channels(1));
      train = tr.load({}, threads, progress);
      train.class_names = test.class_names;
      if (train.images.size(1) != 28 || train.images.size(2) != 28)
        throw mdd::Error(train_dir + ": Fashion-MNIST images are 28x28; this folder holds " +
                         std::to_string(train.images.size(1)) + "x" + std::to_string(train.images.size(2)));
      // --ipc selects from the folder (e.g. a generated set sampled with more images per class than kept).
      if (ipc > 0 && needs_features) real = mdd::load_fashion_mnist(fmnist_dir, "train");
    } else if (fashion) {
      train = mdd::load_fashion_mnist(fmnist_dir, "train");
      test = mdd::load_fashion_mnist(fmnist_dir, "test");
      if (ipc > 0 && needs_features) real = train;
    } else {
      if (train_dir.empty() || test_dir.empty()) throw mdd::Error("give --train and --test, or --fashion-mnist");
      const int64_t size = load_size > 0 ? load_size : (protocol == "idc" ? 224 : 0);
      mdd::ImageTransform tf = size > 0 ? mdd::resize_center_crop_transform(size) : mdd::ImageTransform{};
      mdd::ImageFolder tr(train_dir, mdd::ImageFolderOptions().ipc(ipc));
      mdd::ImageFolder te(test_dir, mdd::ImageFolderOptions().classes(tr.classes()));
      train = tr.load(tf, threads, progress);
      test = te.load(tf, threads, progress);
      train.class_names = tr.classes();
    }
    if (fashion && ipc > 0 && needs_features) {
      // Penultimate embeddings of a ConvNet trained on the full real training set.
      // Under its own protocol when that differs, so --protocol changes how sets are judged, not which are chosen.
      // The dataset statistics (set above) hold for either protocol.
      auto fo = feature_protocol == protocol
                    ? o
                    : mdd::EvalOptions().protocol(feature_protocol).seed(seed).device(device).mean(o.mean()).std(o.std());
      fo.epochs(feature_epochs).repeats(1).eval_every(0);
      mdd::Evaluator fe(fo);
      double best = 0, last = 0;
      auto fnet = fe.train_once(real, test, seed + 1000, &best, &last, progress);
      const auto r = fe.resolve(real, test);
      // The real split's embeddings only where they are used: as the set selected from, or for its class means.
      if (train_dir.empty() || herding_target == "real")
        real_features = mdd::Evaluator::embed(fnet, mdd::Evaluator::prepare(real.images, r));
      features = train_dir.empty() ? real_features : mdd::Evaluator::embed(fnet, mdd::Evaluator::prepare(train.images, r));
      rep["feature_net"] = {{"epochs", feature_epochs}, {"protocol", fo.protocol()}, {"test_acc", last}};
      if (group.is_main()) std::fprintf(stderr, "feature network (%lld epochs on the full set): %.2f%%\n", (long long)feature_epochs, last);
    }
    // Every set to evaluate, with its name: one per --select method, or the one training set.
    std::vector<std::pair<std::string, mdd::LabeledImages>> named;
    if (fashion && ipc > 0) {
      const auto targets = herding_target == "real" && real_features.defined()
                               ? mdd::class_means(real_features, real.labels, static_cast<int64_t>(test.class_names.size()))
                               : torch::Tensor();
      for (const auto& m : methods) {
        const auto idx = m == "herding" && targets.defined() ? mdd::select_herding(features, train.labels, ipc, targets)
                                                             : mdd::select_coreset(m, features, train.labels, ipc, seed);
        named.emplace_back(m, mdd::subset(train, idx));
      }
    } else {
      named.emplace_back(fashion && train_dir.empty() ? "all" : "folder", train);
    }
    std::vector<mdd::EvalSet> sets;
    std::vector<mdd::ResolvedEval> resolved;  // per set, for the log line and its report
    for (const auto& [name, set] : named) {
      const auto& r = resolved.emplace_back(mdd::Evaluator(o).resolve(set, test));
      if (group.is_main())
        std::fprintf(stderr, "%s: protocol %s, %s norm %s, %lld train / %lld test images, %lld epochs, batch %lld, lr %g\n",
                     name.c_str(), r.protocol.c_str(), r.net.c_str(), r.norm.c_str(), (long long)set.images.size(0),
                     (long long)test.images.size(0), (long long)r.epochs, (long long)r.batch_size, r.lr);
      sets.push_back(mdd::EvalSet{&set, o, named.size() > 1 ? name : "evaluate"});
    }
    // All sets' repeats form one pool over the processes (--select a,b with --nproc N keeps every rank busy).
    const auto results = mdd::evaluate_sets(sets, test, group, progress, repeat_dir);
    const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (!group.is_main()) return 0;
    for (size_t i = 0; i < named.size(); ++i) {
      const auto& [select_name, set] = named[i];
      const auto& res = results[i];
      const auto& r = resolved[i];
      if (res.reused > 0)
        std::fprintf(stderr, "%s%s%lld of %lld repeats reused from %s\n", named.size() > 1 ? select_name.c_str() : "",
                     named.size() > 1 ? ": " : "", (long long)res.reused, (long long)res.best.size(), repeat_dir.c_str());
      std::printf("%s%stop-1 (best) %.2f +- %.2f   last %.2f +- %.2f   (%lld repeats, %.1f s train+test, %.1f s total)\n",
                  named.size() > 1 ? select_name.c_str() : "", named.size() > 1 ? ": " : "", res.mean, res.std,
                  res.last_mean, res.last_std, (long long)res.best.size(), res.seconds, total);
      if (report.empty()) continue;
      nlohmann::json out = rep;
      out.update({{"protocol", r.protocol}, {"net", r.net}, {"norm", r.norm}, {"image_size", r.image_size}, {"epochs", r.epochs},
                  {"batch_size", r.batch_size}, {"lr", r.lr}, {"augment", r.augment},
                  {"mean_std_norm", {r.mean, r.std}}, {"train_images", set.images.size(0)},
                  {"test_images", test.images.size(0)}, {"select", select_name}, {"ipc", ipc}, {"seed", seed},
                  {"herding_target", herding_target},
                  {"best", res.best}, {"last", res.last}, {"mean", res.mean}, {"std", res.std},
                  {"last_mean", res.last_mean}, {"last_std", res.last_std},
                  {"eval_seconds", res.seconds},  // wall time of the pool of all sets' repeats (this run's)
                  {"reused_repeats", res.reused}, {"repeat_dir", repeat_dir},
                  {"sets_in_pool", named.size()}, {"total_seconds", total}, {"threads", threads},
                  {"processes", group.world_size()}});
      std::filesystem::path path(report);
      if (named.size() > 1) path = path.parent_path() / (select_name + "_" + path.filename().string());
      std::ofstream f(path);
      f << out.dump(2) << "\n";
      if (!f) throw mdd::Error("cannot write report " + path.string());
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
