#include "pipeline/candidate_selection.h"

#include <chrono>
#include <mutex>

#include <fmt/format.h>

#include "mdd/eval/selection.h"
#include "mdd/util/error.h"
#include "pipeline/config_options.h"

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
    EvalOptions o = eval_options_of(config, /*full_set=*/false);
    o.epochs(config.sample.select_epochs).repeats(1).eval_every(0);
    const Evaluator fe(o);
    if (cb.log)
      cb.log(fmt::format("sample: training the selection feature network ({} protocol, {} epoch{} on {} real images)",
                         config.evaluate.protocol, config.sample.select_epochs, config.sample.select_epochs == 1 ? "" : "s",
                         train.images.size(0)));
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
    // A seed of its own, apart from the evaluation repeats' seeds (evaluate.seed + r).
    s->net = fe.train_once(train, check, config.sample.seed + 1000, &best, &last, progress);
    s->resolved = fe.resolve(train, check);
    const auto features = Evaluator::embed(s->net, Evaluator::prepare(train.images, s->resolved));
    s->real_means = class_means(features, train.labels, static_cast<int64_t>(train.class_names.size()));
    s->test_accuracy = last;
    s->epochs = config.sample.select_epochs;
    s->seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (cb.log)
      cb.log(fmt::format("sample: selection feature network ready: {:.2f}% test accuracy ({:.0f} s)", last, s->seconds));
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
  if (s.select == "random") return select_random(labels, s.ipc, s.seed);
  if (s.select != "herding" && s.select != "kcenter")
    throw Error("sample.select is \"" + s.select + "\"; expected herding, kcenter or random");
  const auto sp = space();
  torch::nn::AnyModule net = sp->net;  // embed() takes a mutable module; the copy shares the network
  const auto features = Evaluator::embed(net, Evaluator::prepare(images_u8, sp->resolved));
  if (s.select == "herding") return select_herding(features, labels, s.ipc, sp->real_means);
  return select_kcenter(features, labels, s.ipc);
}

}  // namespace mdd::detail
