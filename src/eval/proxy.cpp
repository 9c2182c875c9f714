#include "mdd/eval/proxy.h"

#include <cmath>
#include <limits>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "mdd/io/safetensors.h"
#include "mdd/io/state_dict.h"
#include "mdd/models/eval_nets.h"
#include "mdd/util/error.h"

namespace mdd {
namespace {

void check_images(const LabeledImages& d, const char* what) {
  if (!d.images.defined() || d.images.dim() != 4 || d.images.scalar_type() != torch::kUInt8)
    throw Error(fmt::format("GeneratorProxy: {} images must be uint8 [N, H, W, C]", what));
  if (!d.labels.defined() || d.labels.dim() != 1 || d.labels.size(0) != d.images.size(0))
    throw Error(fmt::format("GeneratorProxy: {} labels must be [N] with N = {}", what, d.images.size(0)));
}

// Covariance of rows in float64.
std::pair<torch::Tensor, torch::Tensor> moments(const torch::Tensor& x) {
  const auto d = x.to(torch::kFloat64);
  const auto mu = d.mean(0);
  const auto c = d - mu;
  return {mu, c.t().matmul(c) / double(d.size(0) - 1)};
}

torch::Tensor psd_sqrt(const torch::Tensor& s) {
  auto eig = torch::linalg_eigh(s);
  auto w = std::get<0>(eig).clamp_min(0).sqrt();
  auto v = std::get<1>(eig);
  return (v * w.unsqueeze(0)).matmul(v.t());
}

}  // namespace

double frechet_distance(const torch::Tensor& a, const torch::Tensor& b) {
  if (!a.defined() || !b.defined() || a.dim() != 2 || b.dim() != 2 || a.size(1) != b.size(1))
    throw Error("frechet_distance: expected feature matrices [N1, D] and [N2, D] with the same D");
  if (a.size(0) < 2 || b.size(0) < 2) throw Error("frechet_distance: need at least 2 rows in each set");
  if (!torch::isfinite(a).all().item<bool>() || !torch::isfinite(b).all().item<bool>())
    throw Error("frechet_distance: features contain NaN/Inf");
  torch::NoGradGuard ng;
  auto [mu1, s1] = moments(a.cpu());
  auto [mu2, s2] = moments(b.cpu());
  // tr(sqrt(S1 S2)) = tr(sqrt(S1^1/2 S2 S1^1/2)), the latter symmetric PSD.
  const auto r = psd_sqrt(s1);
  auto m = r.matmul(s2).matmul(r);
  m = (m + m.t()) * 0.5;
  const double tr_sqrt = torch::linalg_eigvalsh(m).clamp_min(0).sqrt().sum().item<double>();
  const double d2 = (mu1 - mu2).pow(2).sum().item<double>();
  return std::max(0.0, d2 + s1.trace().item<double>() + s2.trace().item<double>() - 2.0 * tr_sqrt);
}

GeneratorProxy::GeneratorProxy(const LabeledImages& train, const LabeledImages& test, ProxyOptions options,
                               const ProgressFn& progress)
    : options_(std::move(options)) {
  check_images(train, "training");
  check_images(test, "test");
  Evaluator ev(options_.eval());
  resolved_ = ev.resolve(train, test);
  double best = 0, last = 0;
  net_ = ev.train_once(train, test, options_.seed(), &best, &last, progress);
  prepare_reference(train, test);
}

void GeneratorProxy::prepare_reference(const LabeledImages& train, const LabeledImages& test) {
  const auto x = Evaluator::prepare(test.images, resolved_).to(torch::Device(options_.eval().device()));
  test_accuracy_ = Evaluator::accuracy(net_, x, test.labels.to(x.device()), 500);
  test_features_ = Evaluator::embed(net_, x).cpu();
  train_images_ = train.images;
  train_labels_ = train.labels;
}

torch::Tensor GeneratorProxy::features(const torch::Tensor& images_u8) const {
  const auto x = Evaluator::prepare(images_u8, resolved_).to(torch::Device(options_.eval().device()));
  return Evaluator::embed(net_, x).cpu();
}

ProxyScore GeneratorProxy::score(const LabeledImages& gen) const {
  check_images(gen, "generated");
  if (gen.images.size(1) != train_images_.size(1) || gen.images.size(2) != train_images_.size(2) ||
      gen.images.size(3) != train_images_.size(3))
    throw Error(fmt::format("GeneratorProxy: generated images are {} but the classifier was trained on {}",
                            c10::str(gen.images.sizes().slice(1)), c10::str(train_images_.sizes().slice(1))));
  const int64_t n = gen.images.size(0);
  if (n < 2) throw Error("GeneratorProxy: score needs at least 2 generated images");
  const int64_t nc = resolved_.num_classes;
  const auto labels = gen.labels.to(torch::kInt64).cpu();
  if (labels.min().item<int64_t>() < 0 || labels.max().item<int64_t>() >= nc)
    throw Error(fmt::format("GeneratorProxy: labels must lie in [0, {})", nc));
  ProxyScore s;
  s.images = n;
  s.real_test_accuracy = test_accuracy_;
  const auto x = Evaluator::prepare(gen.images, resolved_).to(torch::Device(options_.eval().device()));
  // One pass: the embedding feeds both the Fréchet distance and (through the classifier head) the
  // predictions. Eval mode so that a BatchNorm variant would use its running statistics.
  torch::Tensor feats, pred;
  {
    auto* impl = as_eval_net(net_);
    const bool was_training = impl->is_training();
    impl->eval();
    torch::NoGradGuard ng;
    std::vector<torch::Tensor> fparts, pparts;
    for (int64_t b = 0; b < n; b += 500) {
      auto e = impl->embed(x.slice(0, b, std::min(n, b + 500)));
      pparts.push_back(impl->classify(e).argmax(1).cpu());
      fparts.push_back(e.cpu());
    }
    impl->train(was_training);
    feats = torch::cat(fparts);
    pred = torch::cat(pparts);
  }
  const auto hit = (pred == labels).to(torch::kFloat64);
  s.class_accuracy = 100.0 * hit.mean().item<double>();
  for (int64_t c = 0; c < nc; ++c) {
    const auto m = labels == c;
    const int64_t k = m.sum().item<int64_t>();
    s.per_class.push_back(k ? 100.0 * hit.index({m}).mean().item<double>() : std::numeric_limits<double>::quiet_NaN());
  }
  s.frechet = frechet_distance(feats, test_features_);
  // The floor: as many random real training images (small-sample bias of the estimate).
  auto g = at::detail::createCPUGenerator(options_.floor_seed());
  const auto idx = torch::randperm(train_images_.size(0), g, torch::kInt64).slice(0, 0, std::min(n, train_images_.size(0)));
  s.frechet_real_floor = frechet_distance(features(train_images_.index_select(0, idx)), test_features_);
  return s;
}

void GeneratorProxy::save(const std::string& path) const {
  auto* impl = as_eval_net(net_);
  nlohmann::json meta = {{"net", resolved_.net}, {"num_classes", resolved_.num_classes},
                         {"image_size", resolved_.image_size}, {"norm", resolved_.norm},
                         {"width", resolved_.width}, {"in_channels", resolved_.in_channels},
                         {"mean", resolved_.mean}, {"std", resolved_.std},
                         {"seed", std::to_string(options_.seed())}, {"protocol", resolved_.protocol},
                         {"epochs", resolved_.epochs}};
  io::save_safetensors(path, state_dict(*impl), {{"format", "mdd-generator-proxy"}, {"recipe", meta.dump()}});
}

GeneratorProxy GeneratorProxy::load(const std::string& path, const LabeledImages& train, const LabeledImages& test) {
  check_images(train, "training");
  check_images(test, "test");
  auto st = io::load_safetensors(path);
  if (!st.metadata.count("format") || st.metadata.at("format") != "mdd-generator-proxy" || !st.metadata.count("recipe"))
    throw Error(path + ": not a generator-proxy file (no format/recipe metadata)");
  nlohmann::json m = nlohmann::json::parse(st.metadata.at("recipe"), nullptr, /*allow_exceptions=*/false);
  if (m.is_discarded() || !m.is_object()) throw Error(path + ": the proxy recipe is not a JSON object");
  GeneratorProxy p;
  try {
    ProxyOptions o;
    o.eval(EvalOptions().protocol(m.at("protocol").get<std::string>()).net(m.at("net").get<std::string>()).norm(
        m.at("norm").get<std::string>()).width(m.at("width").get<int64_t>()).epochs(m.at("epochs").get<int64_t>()));
    p.options_ = o;
    p.resolved_ = Evaluator(o.eval()).resolve(train, test);
    p.resolved_.mean = m.at("mean").get<std::vector<double>>();
    p.resolved_.std = m.at("std").get<std::vector<double>>();
    if (p.resolved_.in_channels != m.at("in_channels").get<int64_t>() ||
        p.resolved_.num_classes != m.at("num_classes").get<int64_t>() ||
        p.resolved_.image_size != m.at("image_size").get<int64_t>())
      throw Error(path + ": the proxy was trained on other data (channels, classes or image size differ)");
  } catch (const nlohmann::json::exception& e) {
    throw Error(path + ": bad proxy recipe: " + e.what());
  }
  p.net_ = make_eval_net(p.resolved_.net, p.resolved_.num_classes, p.resolved_.image_size, p.resolved_.norm,
                         p.resolved_.width, p.resolved_.in_channels);
  load_state_dict(*as_eval_net(p.net_), st.tensors, /*strict=*/true);
  as_eval_net(p.net_)->to(torch::Device(p.options_.eval().device()));
  p.prepare_reference(train, test);
  return p;
}

}  // namespace mdd
