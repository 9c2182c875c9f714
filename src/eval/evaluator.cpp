#include "mdd/eval/evaluator.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <optional>
#include <utility>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "mdd/data/latent_cache.h"
#include "mdd/eval/augment.h"
#include "mdd/models/eval_nets.h"
#include "mdd/util/error.h"
#include "util/enum_names.h"
#include "util/file_util.h"
#include "util/fnv.h"

namespace mdd {
namespace {

namespace F = torch::nn::functional;

void check_set(const LabeledImages& d, const char* what) {
  if (!d.images.defined() || d.images.dim() != 4 || d.images.scalar_type() != torch::kUInt8) {
    throw Error(fmt::format("evaluate: {} images must be uint8 [N, H, W, C], got {}", what,
                            d.images.defined() ? d.images.sizes().vec() : std::vector<int64_t>{}));
  }
  const int64_t c = d.images.size(3);
  if (c != 1 && c != 3) throw Error(fmt::format("evaluate: {} images have {} channels (expected 1 or 3)", what, c));
  if (!d.labels.defined() || d.labels.dim() != 1 || d.labels.scalar_type() != torch::kLong ||
      d.labels.size(0) != d.images.size(0)) {
    throw Error(fmt::format("evaluate: {} labels must be int64 [N] with N = {}", what, d.images.size(0)));
  }
  if (d.images.size(0) == 0) throw Error(fmt::format("evaluate: {} set is empty", what));
  if (d.labels.min().item<int64_t>() < 0) throw Error(fmt::format("evaluate: {} has negative labels", what));
}

/// uint8 [N,H,W,C] -> float [N,C',S,S] in [0, 1] (grey replicated when the network takes 3).
torch::Tensor to_unit(const torch::Tensor& u8, const ResolvedEval& r) {
  auto x = u8.permute({0, 3, 1, 2}).to(torch::kFloat32).div_(255.0);
  if (x.size(1) == 1 && r.in_channels == 3) x = x.expand({-1, 3, -1, -1});
  return resize_center_crop(x.contiguous(), r.image_size);
}

double population_std(const std::vector<double>& v, double mean) {
  if (v.empty()) return 0;
  double s = 0;
  for (double x : v) s += (x - mean) * (x - mean);
  return std::sqrt(s / static_cast<double>(v.size()));
}

double mean_of(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0 : s / static_cast<double>(v.size());
}

}  // namespace

int64_t ipc_epoch(int64_t ipc, int64_t num_classes) {
  int64_t e;
  if (ipc == 1) {
    e = 3000;
  } else if (ipc <= 10) {
    e = 2000;
  } else if (ipc <= 50) {
    e = 1500;
  } else if (ipc <= 200) {
    e = 1000;
  } else if (ipc <= 500) {
    e = 500;
  } else {
    e = 300;
  }
  if (num_classes == 100) {
    e = static_cast<int64_t>((2.0 / 3.0) * static_cast<double>(e));
    e -= e % 100;
  }
  return e;
}

namespace {
constexpr detail::EnumNames<EvalProtocol, 2> kProtocolNames{{{EvalProtocol::kIdc, "idc"}, {EvalProtocol::kDc, "dc"}}};
}  // namespace

const char* eval_protocol_name(EvalProtocol p) { return detail::enum_name(kProtocolNames, p); }

EvalProtocol parse_eval_protocol(const std::string& name) {
  return detail::parse_enum(kProtocolNames, "evaluate: protocol", name);
}

void check_options(const EvalOptions& o, const OptionFail& fail) {
  try {
    parse_eval_protocol(o.protocol());
  } catch (const Error& e) {
    fail("protocol", std::string("is invalid: ") + e.what());
  }
  if (!o.augment().empty() && o.augment() != "none" && o.augment() != "idc")
    fail("augment", fmt::format("is '{}'; expected none or idc", o.augment()));
  if (!o.norm().empty() && o.norm() != "instance" && o.norm() != "batch" && o.norm() != "none")
    fail("norm", fmt::format("is '{}'; expected instance, batch or none", o.norm()));
  if (o.repeats() < 1) fail("repeats", fmt::format("must be >= 1, got {}", o.repeats()));
  if (o.test_batch_size() < 1) fail("test_batch_size", fmt::format("must be >= 1, got {}", o.test_batch_size()));
  for (auto [name, v] : {std::pair<const char*, int64_t>{"epochs", o.epochs()}, {"batch_size", o.batch_size()},
                         {"eval_every", o.eval_every()}, {"image_size", o.image_size()}, {"width", o.width()},
                         {"ipc", o.ipc()}})
    if (v < 0) fail(name, fmt::format("must be >= 0, got {}", v));
  if (!(o.lr() >= 0) || !std::isfinite(o.lr())) fail("lr", fmt::format("must be finite and >= 0, got {}", o.lr()));
  if (o.mean().size() != o.std().size())
    fail("mean", fmt::format("has {} entries but std has {}", o.mean().size(), o.std().size()));
  for (double s : o.std())
    if (!(s > 0)) fail("std", fmt::format("entries must be > 0, got {}", s));
}

Evaluator::Evaluator(EvalOptions options) : options_(std::move(options)) {
  check_options(options_, throw_option_error("evaluate"));
}

ResolvedEval Evaluator::resolve(const LabeledImages& train, const LabeledImages& test) const {
  check_set(train, "train");
  check_set(test, "test");
  const auto& o = options_;
  if (train.images.size(3) != test.images.size(3)) {
    throw Error(fmt::format("evaluate: train has {} channels, test {}", train.images.size(3), test.images.size(3)));
  }
  ResolvedEval r;
  r.protocol = o.protocol();
  const bool idc = parse_eval_protocol(r.protocol) == EvalProtocol::kIdc;
  r.num_classes = std::max<int64_t>({static_cast<int64_t>(train.class_names.size()),
                                     train.labels.max().item<int64_t>() + 1, test.labels.max().item<int64_t>() + 1});
  r.net = !o.net().empty() ? o.net() : (idc ? "resnet_ap10" : "convnet3");
  r.norm = !o.norm().empty() ? o.norm() : "instance";
  r.width = o.width();
  r.image_size = o.image_size() > 0 ? o.image_size() : (idc ? 224 : train.images.size(1));
  // dc builds the network for the data's channels (DC: channel = 1 for MNIST-like sets); idc
  // networks take RGB, so grey images are replicated.
  r.in_channels = idc ? 3 : train.images.size(3);
  r.batch_size = o.batch_size() > 0 ? o.batch_size() : (idc ? 64 : 256);
  r.lr = o.lr() > 0 ? o.lr() : 0.01;
  r.momentum = o.momentum() >= 0 ? o.momentum() : 0.9;
  r.weight_decay = o.weight_decay() >= 0 ? o.weight_decay() : 5e-4;
  r.augment = !o.augment().empty() ? o.augment() : (idc ? "idc" : "none");
  if (o.ipc() > 0) {
    r.ipc = o.ipc();
  } else {
    r.ipc = torch::bincount(train.labels.cpu()).max().item<int64_t>();
  }
  if (idc) {
    r.epochs = o.epochs() > 0 ? o.epochs() : ipc_epoch(r.ipc, r.num_classes);
    r.milestones = {2 * r.epochs / 3, 5 * r.epochs / 6};  // MultiStepLR, stepped after each epoch
    r.gamma = 0.2;
    r.reset_momentum = false;
    r.eval_every = o.eval_every() > 0 ? o.eval_every() : std::max<int64_t>(1, r.epochs / 100);
  } else {
    r.epochs = o.epochs() > 0 ? o.epochs() : 300;
    // evaluate_synset: passes ep = 0..E, decay after pass E//2+1 (0-based) = epoch E/2+2 (1-based).
    r.milestones = {r.epochs / 2 + 2};
    r.gamma = 0.1;
    r.reset_momentum = true;
    r.eval_every = o.eval_every();
  }
  if (!o.mean().empty()) {
    r.mean = o.mean();
    r.std = o.std();
    if (static_cast<int64_t>(r.mean.size()) == 1 && r.in_channels == 3) {
      r.mean.assign(3, r.mean[0]);
      r.std.assign(3, r.std[0]);
    }
    if (static_cast<int64_t>(r.mean.size()) != r.in_channels) {
      throw Error(fmt::format("evaluate: mean/std have {} entries for {} input channels", r.mean.size(), r.in_channels));
    }
  } else if (idc) {
    r.mean = {0.485, 0.456, 0.406};
    r.std = {0.229, 0.224, 0.225};
  } else {
    // DC normalises with the dataset's statistics; the test set is the real data at hand.
    auto x = test.images.to(torch::kFloat64).div(255.0);
    const int64_t c = x.size(3);
    auto flat = x.reshape({-1, c});
    auto m = flat.mean(0), s = flat.std(0);
    for (int64_t i = 0; i < c; ++i) {
      r.mean.push_back(m[i].item<double>());
      r.std.push_back(std::max(s[i].item<double>(), 1e-6));
    }
  }
  if (r.epochs < 1 || r.batch_size < 1) throw Error("evaluate: epochs and batch size must be >= 1");
  return r;
}

torch::Tensor Evaluator::prepare(const torch::Tensor& images_u8, const ResolvedEval& r) {
  return normalize_batch(to_unit(images_u8, r), r.mean, r.std);
}

double Evaluator::accuracy(torch::nn::AnyModule& net, const torch::Tensor& inputs, const torch::Tensor& labels,
                           int64_t batch_size) {
  auto* impl = as_eval_net(net);
  const bool was_training = impl->is_training();
  impl->eval();
  torch::NoGradGuard no_grad;
  auto correct = torch::zeros({}, torch::TensorOptions().dtype(torch::kLong).device(inputs.device()));
  const int64_t n = inputs.size(0);
  for (int64_t b = 0; b < n; b += batch_size) {
    const int64_t e = std::min(n, b + batch_size);
    auto pred = impl->forward(inputs.slice(0, b, e)).argmax(1);
    correct += (pred == labels.slice(0, b, e)).sum();
  }
  impl->train(was_training);
  return 100.0 * static_cast<double>(correct.item<int64_t>()) / static_cast<double>(n);
}

torch::Tensor Evaluator::embed(torch::nn::AnyModule& net, const torch::Tensor& inputs, int64_t batch_size) {
  auto* impl = as_eval_net(net);
  const bool was_training = impl->is_training();
  impl->eval();
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> out;
  for (int64_t b = 0; b < inputs.size(0); b += batch_size) {
    out.push_back(impl->embed(inputs.slice(0, b, std::min(inputs.size(0), b + batch_size))));
  }
  impl->train(was_training);
  return torch::cat(out);
}

torch::nn::AnyModule Evaluator::train_once(const LabeledImages& train, const LabeledImages& test, uint64_t seed,
                                           double* best, double* last, const ProgressFn& progress) const {
  const ResolvedEval r = resolve(train, test);
  const torch::Device device(options_.device());
  const auto t0 = std::chrono::steady_clock::now();
  auto gen = torch::make_generator<torch::CPUGeneratorImpl>(seed);

  auto net = make_eval_net(r.net, r.num_classes, r.image_size, r.norm, r.width, r.in_channels);
  auto* impl = as_eval_net(net);
  impl->reset_parameters(gen);
  impl->to(device);
  impl->train();

  const bool augment = r.augment == "idc";
  // Without augmentation the normalised training tensor is computed once; with it the per-batch
  // transform works on [0, 1] images and normalises last, as the reference pipeline does.
  torch::Tensor train_x = augment ? to_unit(train.images, r) : prepare(train.images, r);
  train_x = train_x.to(device);
  const auto train_y = train.labels.to(device);
  const auto test_x = prepare(test.images, r).to(device);
  const auto test_y = test.labels.to(device);

  auto make_opt = [&](double lr) {
    return std::make_unique<torch::optim::SGD>(
        impl->parameters(), torch::optim::SGDOptions(lr).momentum(r.momentum).weight_decay(r.weight_decay));
  };
  double lr = r.lr;
  auto opt = make_opt(lr);
  const int64_t n = train_x.size(0);
  const int64_t passes = parse_eval_protocol(r.protocol) == EvalProtocol::kDc ? r.epochs + 1 : r.epochs;
  double best_acc = 0, last_acc = 0;
  torch::Tensor last_loss;
  for (int64_t ep = 1; ep <= passes; ++ep) {
    auto perm = torch::randperm(n, gen, torch::kLong).to(device);
    for (int64_t b = 0; b < n; b += r.batch_size) {
      auto idx = perm.slice(0, b, std::min(n, b + r.batch_size));
      auto x = train_x.index_select(0, idx);
      auto y = train_y.index_select(0, idx);
      torch::Tensor loss;
      if (augment) {
        x = idc_train_transform(x, r.image_size, r.mean, r.std, gen);
        auto cm = cutmix(x, y, gen);
        auto out = impl->forward(cm.images);
        loss = F::cross_entropy(out, cm.labels_a) * cm.ratio + F::cross_entropy(out, cm.labels_b) * (1.0 - cm.ratio);
      } else {
        loss = F::cross_entropy(impl->forward(x), y);
      }
      opt->zero_grad();
      loss.backward();
      opt->step();
      last_loss = loss.detach();
    }
    const bool test_now = ep == passes || (r.eval_every > 0 && ep % r.eval_every == 0);
    if (test_now) {
      // One host sync per test, not per step.
      if (!std::isfinite(last_loss.item<double>())) {
        throw Error(fmt::format("evaluate: training loss became non-finite at epoch {} (seed {})", ep, seed));
      }
      last_acc = accuracy(net, test_x, test_y, options_.test_batch_size());
      best_acc = std::max(best_acc, last_acc);
    }
    if (progress) {
      const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      progress(Progress{"evaluate", ep, passes, el});
    }
    if (std::find(r.milestones.begin(), r.milestones.end(), ep) != r.milestones.end()) {
      lr *= r.gamma;
      if (r.reset_momentum) {
        opt = make_opt(lr);
      } else {
        for (auto& g : opt->param_groups()) static_cast<torch::optim::SGDOptions&>(g.options()).lr(lr);
      }
    }
  }
  impl->eval();
  if (best) *best = best_acc;
  if (last) *last = last_acc;
  return net;
}

EvalResult Evaluator::run(const LabeledImages& train, const LabeledImages& test, const ProgressFn& progress) const {
  return run(train, test, dist::ProcessGroup(), progress);
}

EvalResult Evaluator::run(const LabeledImages& train, const LabeledImages& test, const dist::ProcessGroup& group,
                          const ProgressFn& progress) const {
  return evaluate_sets({EvalSet{&train, options_, "evaluate"}}, test, group, progress).front();
}

namespace {

using json = nlohmann::json;

// One repeat's file in a repeat folder: where it lives and what it must have been computed from.
struct RepeatKey {
  std::string path;
  json signature;
};

// Everything the repeat's accuracies depend on: the data (by content), the recipe after the preset
// (so "0 = the protocol's value" and the explicit value are the same repeat), the device type (CPU
// and CUDA kernels round differently) and the seed. Thread counts and test batch sizes are left out:
// they change no accuracy beyond the last digits of a float sum.
json repeat_signature(const ResolvedEval& r, const EvalOptions& o, const std::string& train_fp,
                      const std::string& test_fp, uint64_t seed) {
  return {{"format", "mdd-eval-repeat-1"}, {"train", train_fp}, {"test", test_fp}, {"seed", seed},
          {"device", c10::DeviceTypeName(torch::Device(o.device()).type(), /*lower_case=*/true)},
          {"protocol", r.protocol}, {"net", r.net}, {"norm", r.norm}, {"augment", r.augment}, {"width", r.width},
          {"image_size", r.image_size}, {"in_channels", r.in_channels}, {"batch_size", r.batch_size},
          {"epochs", r.epochs}, {"eval_every", r.eval_every}, {"ipc", r.ipc}, {"num_classes", r.num_classes},
          {"lr", r.lr}, {"momentum", r.momentum}, {"weight_decay", r.weight_decay}, {"milestones", r.milestones},
          {"gamma", r.gamma}, {"reset_momentum", r.reset_momentum}, {"mean", r.mean}, {"std", r.std}};
}

// A file name a person can read ("<label>-s<seed>-") and that no label can turn into a path.
std::string repeat_file_name(const std::string& label, uint64_t seed, const json& signature) {
  std::string name;
  for (char c : label.substr(0, 64)) name += (std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_') ? c : '_';
  // A stable hash of the signature: distinct recipes get distinct files.
  return fmt::format("{}-s{}-{:016x}.json", name.empty() ? "set" : name, seed, fnv1a64(signature.dump()));
}

// The stored [best, last] of a repeat, or nothing when the file is absent, unreadable, another
// recipe's, or holds values no accuracy can have.
std::optional<std::pair<double, double>> read_repeat(const RepeatKey& key) {
  const std::string text = read_cache_text(key.path, uint64_t(1) << 20);
  if (text.empty()) return std::nullopt;
  try {
    const json j = json::parse(text);
    if (j.at("signature") != key.signature) return std::nullopt;
    const double best = j.at("best").get<double>(), last = j.at("last").get<double>();
    auto ok = [](double a) { return std::isfinite(a) && a >= 0 && a <= 100; };
    if (!ok(best) || !ok(last)) return std::nullopt;
    return std::make_pair(best, last);
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

}  // namespace

std::vector<EvalResult> evaluate_sets(const std::vector<EvalSet>& sets, const LabeledImages& test,
                                      const dist::ProcessGroup& group, const ProgressFn& progress) {
  return evaluate_sets(sets, test, group, progress, "");
}

std::vector<EvalResult> evaluate_sets(const std::vector<EvalSet>& sets, const LabeledImages& test,
                                      const dist::ProcessGroup& group_in, const ProgressFn& progress,
                                      const std::string& repeat_dir) {
  dist::ProcessGroup group = group_in;  // a handle: copies share the group (one process: all no-ops)
  std::vector<Evaluator> evaluators;
  std::vector<ResolvedEval> resolved;
  std::vector<int64_t> first;  // first job index of each set
  int64_t total = 0;
  for (size_t k = 0; k < sets.size(); ++k) {
    if (sets[k].train == nullptr) throw Error(fmt::format("evaluate_sets: set {} has no training images", k));
    evaluators.emplace_back(sets[k].options);
    resolved.push_back(evaluators.back().resolve(*sets[k].train, test));  // validate before any work (every rank fails alike)
    first.push_back(total);
    total += sets[k].options.repeats();
  }
  auto set_of = [&](int64_t j) {
    size_t k = 0;
    while (k + 1 < sets.size() && j >= first[k + 1]) ++k;
    return k;
  };
  auto stage_of = [&](size_t k, int64_t rep) { return fmt::format("{} {}/{}", sets[k].label, rep + 1, sets[k].options.repeats()); };
  const auto t0 = std::chrono::steady_clock::now();
  // [best, last] of every job; the rows a rank did not run stay 0, so the sum over ranks is the
  // whole table.
  torch::Tensor table = torch::zeros({total, 2}, torch::kFloat64);
  std::vector<RepeatKey> keys(static_cast<size_t>(total));
  std::vector<int64_t> pending;  // jobs still to run, the same list on every rank
  std::vector<char> reused(static_cast<size_t>(total), 0);
  if (!repeat_dir.empty()) {
    const std::string test_fp = dataset_fingerprint(test);
    // [count, best, last] per job over the ranks that found it: summed, so a file on any rank's disk counts.
    torch::Tensor found = torch::zeros({total, 3}, torch::kFloat64);
    for (size_t k = 0; k < sets.size(); ++k) {
      const std::string train_fp = dataset_fingerprint(*sets[k].train);
      for (int64_t rep = 0; rep < sets[k].options.repeats(); ++rep) {
        const int64_t j = first[k] + rep;
        const uint64_t seed = sets[k].options.seed() + static_cast<uint64_t>(rep);
        RepeatKey& key = keys[static_cast<size_t>(j)];
        key.signature = repeat_signature(resolved[k], sets[k].options, train_fp, test_fp, seed);
        key.path = (std::filesystem::path(repeat_dir) / repeat_file_name(sets[k].label, seed, key.signature)).string();
        if (const auto r = read_repeat(key)) {
          found[j][0] = 1.0;
          found[j][1] = r->first;
          found[j][2] = r->second;
        }
      }
    }
    std::vector<torch::Tensor> f{found};
    group.all_reduce_sum(f);
    found = f[0];
    for (int64_t j = 0; j < total; ++j) {
      const double n = found[j][0].item<double>();
      if (n > 0) {
        // Every rank that found it read the same signature; their values agree up to the device's
        // rounding. Only rank 0 fills the row, so the final sum over ranks counts it once.
        if (group.rank() == 0) {
          table[j][0] = found[j][1].item<double>() / n;
          table[j][1] = found[j][2].item<double>() / n;
        }
        reused[static_cast<size_t>(j)] = 1;
        const size_t k = set_of(j);
        if (progress && group.rank() == 0) {
          // The same step count as a run repeat's last event (dc trains one pass more than its epochs).
          const ResolvedEval& r = resolved[k];
          const int64_t passes = parse_eval_protocol(r.protocol) == EvalProtocol::kDc ? r.epochs + 1 : r.epochs;
          progress(Progress{stage_of(k, j - first[k]), passes, passes, 0.0});
        }
      } else {
        pending.push_back(j);
      }
    }
  } else {
    for (int64_t j = 0; j < total; ++j) pending.push_back(j);
  }
  for (size_t i = static_cast<size_t>(group.rank()); i < pending.size(); i += static_cast<size_t>(group.world_size())) {
    const int64_t j = pending[i];
    const size_t k = set_of(j);
    const int64_t rep = j - first[k];
    ProgressFn p;
    if (progress) {
      p = [&progress, stage = stage_of(k, rep)](const Progress& e) {
        Progress q = e;
        q.stage = stage;
        progress(q);
      };
    }
    double best = 0, last = 0;
    const uint64_t seed = sets[k].options.seed() + static_cast<uint64_t>(rep);
    const auto r0 = std::chrono::steady_clock::now();
    evaluators[k].train_once(*sets[k].train, test, seed, &best, &last, p);
    table[j][0] = best;
    table[j][1] = last;
    if (!repeat_dir.empty()) {
      const RepeatKey& key = keys[static_cast<size_t>(j)];
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - r0).count();
      write_text_file_atomic(key.path, json({{"signature", key.signature}, {"best", best}, {"last", last},
                                             {"seconds", std::round(s * 10) / 10}})
                                           .dump(2) + "\n");
    }
  }
  // A repeat can take far longer than the group's default timeout, and ranks finish at different
  // times: wait without a limit that a slow repeat could hit (a rank that exits still ends it).
  group.barrier(std::chrono::hours(72));
  std::vector<torch::Tensor> t{table};
  group.all_reduce_sum(t);
  table = t[0];
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::vector<EvalResult> out;
  for (size_t s = 0; s < sets.size(); ++s) {
    std::vector<double> best, last;
    int64_t n_reused = 0;
    for (int64_t rep = 0; rep < sets[s].options.repeats(); ++rep) {
      best.push_back(table[first[s] + rep][0].item<double>());
      last.push_back(table[first[s] + rep][1].item<double>());
      n_reused += reused[static_cast<size_t>(first[s] + rep)];
    }
    out.push_back(summarize_eval(std::move(best), std::move(last), seconds));
    out.back().reused = n_reused;
  }
  return out;
}

EvalResult summarize_eval(std::vector<double> best, std::vector<double> last, double seconds) {
  EvalResult res;
  res.best = std::move(best);
  res.last = std::move(last);
  res.mean = mean_of(res.best);
  res.std = population_std(res.best, res.mean);
  res.last_mean = mean_of(res.last);
  res.last_std = population_std(res.last, res.last_mean);
  res.seconds = seconds;
  return res;
}

EvalResult evaluate(const LabeledImages& train, const LabeledImages& test, const EvalOptions& options,
                    const ProgressFn& progress) {
  return Evaluator(options).run(train, test, progress);
}

}  // namespace mdd
