#include "pipeline/candidate_selection.h"

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "mdd/data/latent_cache.h"
#include "mdd/eval/selection.h"
#include "mdd/io/safetensors.h"
#include "mdd/io/state_dict.h"
#include "mdd/models/eval_nets.h"
#include "mdd/util/error.h"
#include "pipeline/config_options.h"
#include "pipeline/stage_cache.h"

namespace mdd::detail {

SelectionSpaceFn lazy_selection_space(const DistillConfig& config, const PipelineData& data, const PipelineCallbacks& cb) {
  struct State {
    std::mutex mu;
    std::shared_ptr<const SelectionSpace> space;
  };
  auto state = std::make_shared<State>();
  return [state, &config, &data, cb]() -> std::shared_ptr<const SelectionSpace> {
    std::lock_guard<std::mutex> lock(state->mu);
    if (state->space) return state->space;
    const auto& train = data.train;
    if (!train.images.defined() || train.images.size(0) == 0)
      throw Error("sample: selecting among candidates needs the real training images (none loaded)");
    // The test split only reports how good the feature network is; without one a slice of the
    // training split stands in (the number then says little, the selection is unaffected).
    LabeledImages check = data.test;
    if (!check.images.defined() || check.images.size(0) == 0) {
      const int64_t n = std::min<int64_t>(train.images.size(0), 1000);
      check.images = train.images.slice(0, 0, n);
      check.labels = train.labels.slice(0, 0, n);
      check.class_names = train.class_names;
    }
    const auto t0 = std::chrono::steady_clock::now();
    // A seed of its own, apart from the evaluation repeats' seeds (evaluate.seed + r).
    const uint64_t seed = config.sample.seed + 1000;
    // sample.select_per_class: a seeded random subset, the same count from every class (at most
    // the smallest class's count), instead of all real images.
    const int64_t nclass = static_cast<int64_t>(train.class_names.size());
    const int64_t smallest = torch::bincount(train.labels.cpu(), {}, nclass).min().item<int64_t>();
    const int64_t per_class = std::min(config.sample.select_per_class, smallest);
    const bool part = config.sample.select_per_class > 0 && per_class * nclass < train.images.size(0);
    const int64_t n_train = part ? per_class * nclass : train.images.size(0);
    EvalOptions o = eval_options_of(config, /*full_set=*/false);
    o.epochs(config.sample.select_epochs).repeats(1).eval_every(0);
    const Evaluator fe(o);
    // The network depends only on the real data and these settings: kept under cache/ so that
    // re-runs, other IPCs and other sample settings in the same folder do not train it again.
    // (A subset's network has a file of its own, so switching back and forth trains neither again.)
    const std::string cache = (std::filesystem::path(config.output_dir) / "cache" /
                               (part ? fmt::format("select_features_{}pc.safetensors", per_class) : "select_features.safetensors"))
                                  .string();
    nlohmann::json sig = {{"protocol", config.evaluate.protocol}, {"image_size", config.evaluate.image_size},
                          {"epochs", config.sample.select_epochs}, {"seed", seed},
                          {"train", dataset_fingerprint(train)}, {"check", dataset_fingerprint(check)}};
    if (part) sig["train_per_class"] = per_class;  // caches of all-image runs stay valid
    const LogFn log = cb.log ? LogFn(cb.log) : LogFn();
    if (auto st = load_stage_output(cache, sig.dump(), log)) {
      auto s = std::make_shared<SelectionSpace>();
      s->resolved = fe.resolve(train, check);
      const auto& r = s->resolved;
      s->net = make_eval_net(r.net, r.num_classes, r.image_size, r.norm, r.width, r.in_channels);
      io::TensorMap weights = st->tensors;
      const auto means = weights.find("real_means");
      if (means != weights.end()) {
        s->real_means = means->second.to(torch::kFloat64);
        weights.erase(means);
        const auto report = load_state_dict(*as_eval_net(s->net), weights, /*strict=*/false);
        if (report.ok()) {
          as_eval_net(s->net)->eval();
          const auto acc = st->metadata.find("test_accuracy");
          s->test_accuracy = acc == st->metadata.end() ? 0.0 : std::atof(acc->second.c_str());
          s->train_images = n_train;
          if (cb.log) cb.log("sample: reusing the selection feature network " + cache);
          state->space = s;
          return state->space;
        }
      }
      if (cb.log) cb.log("sample: " + cache + " does not fit this network; training it again");
    }
    if (cb.log)
      cb.log(fmt::format("sample: training the selection feature network ({} protocol, {} epoch{} on {} real images)",
                         config.evaluate.protocol, config.sample.select_epochs, config.sample.select_epochs == 1 ? "" : "s",
                         part ? fmt::format("{} per class, {} of {}", per_class, n_train, train.images.size(0))
                                                        : std::to_string(n_train)));
    ProgressFn progress;
    if (cb.progress) {
      progress = [p = cb.progress](const Progress& e) {
        Progress q = e;
        q.stage = "select-features";
        p(q);
      };
    }
    double best = 0, last = 0;
    auto s = std::make_shared<SelectionSpace>();
    const LabeledImages fit = part ? subset(train, select_random(train.labels, per_class, seed)) : train;  // tensor handles
    s->net = fe.train_once(fit, check, seed, &best, &last, progress);
    s->train_images = n_train;
    s->resolved = fe.resolve(train, check);
    const auto features = Evaluator::embed(s->net, Evaluator::prepare(train.images, s->resolved));
    s->real_means = class_means(features, train.labels, static_cast<int64_t>(train.class_names.size()));
    s->test_accuracy = last;
    s->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    io::TensorMap weights = state_dict(*as_eval_net(s->net));
    weights["real_means"] = s->real_means;
    std::filesystem::create_directories(std::filesystem::path(cache).parent_path());
    io::save_safetensors(cache, weights, {{"format", "mdd-select-features"}, {"signature", sig.dump()},
                                          {"test_accuracy", fmt::format("{:.4f}", last)}});
    if (cb.log)
      cb.log(fmt::format("sample: selection feature network ready: {:.2f}% test accuracy ({:.0f} s), saved to {}", last,
                         s->seconds, cache));
    state->space = s;
    return state->space;
  };
}

int64_t candidate_stream_id(int64_t c, int64_t j, int64_t ipc, int64_t candidates, int64_t nclass) {
  if (j < ipc) return c * ipc + j;
  return nclass * ipc + c * ipc * (candidates - 1) + (j - ipc);
}

torch::Tensor select_candidates(const SampleConfig& s, const torch::Tensor& images_u8, const torch::Tensor& labels,
                                const SelectionSpaceFn& space) {
  // Only herding has a target of its own (the real class means); kcenter and random are the
  // coreset dispatch's (random needs no features, so no network is trained for it).
  torch::Tensor features;
  std::shared_ptr<const SelectionSpace> sp;
  if (s.select != "random") {
    sp = space();
    torch::nn::AnyModule net = sp->net;  // embed() takes a mutable module; the copy shares the network
    features = Evaluator::embed(net, Evaluator::prepare(images_u8, sp->resolved));
  }
  if (s.select == "herding") return select_herding(features, labels, s.ipc, sp->real_means);
  return select_coreset(s.select, features, labels, s.ipc, s.seed);
}

}  // namespace mdd::detail
