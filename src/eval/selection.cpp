#include "mdd/eval/selection.h"

#include <limits>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

#include "mdd/data/labeled_images.h"
#include "mdd/util/error.h"

namespace mdd {
namespace {

void check_labels(const torch::Tensor& labels, int64_t per_class) {
  if (!labels.defined() || labels.dim() != 1 || labels.scalar_type() != torch::kLong) {
    throw Error("coreset selection: labels must be int64 [N]");
  }
  if (per_class < 1) throw Error(fmt::format("coreset selection: per_class must be >= 1, got {}", per_class));
}

void check_features(const torch::Tensor& features, const torch::Tensor& labels) {
  if (!features.defined() || features.dim() != 2 || features.size(0) != labels.size(0)) {
    throw Error(fmt::format("coreset selection: features must be [N, D] with N = {} labels, got {}", labels.size(0),
                            features.defined() ? features.sizes().vec() : std::vector<int64_t>{}));
  }
}

/// Indices of every class present, in class order.
std::vector<torch::Tensor> class_members(const torch::Tensor& labels, int64_t per_class) {
  std::vector<torch::Tensor> out;
  if (labels.numel() == 0) return out;
  const int64_t num_classes = labels.max().item<int64_t>() + 1;
  for (int64_t c = 0; c < num_classes; ++c) {
    auto idx = torch::nonzero(labels == c).view({-1});
    if (idx.numel() == 0) continue;
    if (idx.numel() < per_class) {
      throw Error(fmt::format("coreset selection: class {} has {} samples, fewer than {} per class", c, idx.numel(),
                              per_class));
    }
    out.push_back(idx);
  }
  return out;
}

}  // namespace

torch::Tensor select_random(const torch::Tensor& labels, int64_t per_class, uint64_t seed) {
  check_labels(labels, per_class);
  auto gen = torch::make_generator<torch::CPUGeneratorImpl>(seed);
  std::vector<torch::Tensor> picked;
  for (auto& idx : class_members(labels.cpu(), per_class)) {
    picked.push_back(idx.index_select(0, torch::randperm(idx.numel(), gen, torch::kLong).slice(0, 0, per_class)));
  }
  return picked.empty() ? torch::empty({0}, torch::kLong) : torch::cat(picked);
}

torch::Tensor select_first(const torch::Tensor& labels, int64_t per_class) {
  check_labels(labels, per_class);
  std::vector<torch::Tensor> picked;
  for (auto& idx : class_members(labels.cpu(), per_class)) picked.push_back(idx.slice(0, 0, per_class));
  return picked.empty() ? torch::empty({0}, torch::kLong) : torch::cat(picked);
}

namespace {

/// Greedy herding of one class's features `f` [n, D] toward `mu` [D]; returns positions into f.
std::vector<int64_t> herd(const torch::Tensor& f, const torch::Tensor& mu, int64_t per_class) {
  auto sum = torch::zeros_like(mu);
  auto available = torch::ones({f.size(0)}, torch::kBool);
  std::vector<int64_t> chosen;
  for (int64_t k = 0; k < per_class; ++k) {
    // Distance of the would-be mean (sum + f_i) / (k + 1) to the target mean, for every i.
    auto cand = (sum.unsqueeze(0) + f) / static_cast<double>(k + 1);
    auto dist = (cand - mu.unsqueeze(0)).pow(2).sum(1);
    dist.masked_fill_(available.logical_not(), std::numeric_limits<double>::infinity());
    const int64_t best = dist.argmin().item<int64_t>();
    chosen.push_back(best);
    available[best] = false;
    sum += f[best];
  }
  return chosen;
}

torch::Tensor herding_impl(const torch::Tensor& features, const torch::Tensor& labels, int64_t per_class,
                           const torch::Tensor& targets) {
  check_labels(labels, per_class);
  check_features(features, labels);
  auto feats = features.detach().cpu().to(torch::kFloat64);
  torch::Tensor tgt;
  if (targets.defined()) {
    const int64_t num_classes = labels.numel() == 0 ? 0 : labels.max().item<int64_t>() + 1;
    if (targets.dim() != 2 || targets.size(1) != features.size(1) || targets.size(0) < num_classes) {
      throw Error(fmt::format("herding: targets must be [C, {}] with C >= {} classes, got {}", features.size(1),
                              num_classes, targets.sizes().vec()));
    }
    tgt = targets.detach().cpu().to(torch::kFloat64);
    if (!torch::isfinite(tgt).all().item<bool>()) throw Error("herding: targets hold NaN or Inf");
  }
  if (!torch::isfinite(feats).all().item<bool>()) throw Error("herding: features hold NaN or Inf");
  std::vector<torch::Tensor> picked;
  for (auto& idx : class_members(labels.cpu(), per_class)) {
    auto f = feats.index_select(0, idx);  // [n, D]
    auto mu = tgt.defined() ? tgt[labels[idx[0]].item<int64_t>()] : f.mean(0);
    std::vector<int64_t> chosen;
    for (int64_t i : herd(f, mu, per_class)) chosen.push_back(idx[i].item<int64_t>());
    picked.push_back(torch::tensor(chosen, torch::kLong));
  }
  return picked.empty() ? torch::empty({0}, torch::kLong) : torch::cat(picked);
}

}  // namespace

torch::Tensor select_herding(const torch::Tensor& features, const torch::Tensor& labels, int64_t per_class) {
  return herding_impl(features, labels, per_class, torch::Tensor());
}

torch::Tensor select_herding(const torch::Tensor& features, const torch::Tensor& labels, int64_t per_class,
                             const torch::Tensor& targets) {
  if (!targets.defined()) throw Error("herding: targets must be defined (use the 3-argument overload for class means)");
  return herding_impl(features, labels, per_class, targets);
}

torch::Tensor class_means(const torch::Tensor& features, const torch::Tensor& labels, int64_t num_classes) {
  if (!labels.defined() || labels.dim() != 1 || labels.scalar_type() != torch::kLong) {
    throw Error("class_means: labels must be int64 [N]");
  }
  check_features(features, labels);
  if (num_classes < 1) throw Error(fmt::format("class_means: num_classes must be >= 1, got {}", num_classes));
  auto f = features.detach().cpu().to(torch::kFloat64);
  auto l = labels.cpu();
  auto out = torch::empty({num_classes, f.size(1)}, torch::kFloat64);
  for (int64_t c = 0; c < num_classes; ++c) {
    auto idx = torch::nonzero(l == c).view({-1});
    if (idx.numel() == 0) throw Error(fmt::format("class_means: class {} has no samples", c));
    out[c] = f.index_select(0, idx).mean(0);
  }
  return out;
}

torch::Tensor select_kcenter(const torch::Tensor& features, const torch::Tensor& labels, int64_t per_class) {
  check_labels(labels, per_class);
  check_features(features, labels);
  auto feats = features.detach().cpu().to(torch::kFloat64);
  std::vector<torch::Tensor> picked;
  for (auto& idx : class_members(labels.cpu(), per_class)) {
    auto f = feats.index_select(0, idx);
    auto mu = f.mean(0, true);
    int64_t first = (f - mu).pow(2).sum(1).argmin().item<int64_t>();
    std::vector<int64_t> chosen{idx[first].item<int64_t>()};
    auto min_dist = (f - f[first].unsqueeze(0)).pow(2).sum(1);  // squared distance to nearest centre
    for (int64_t k = 1; k < per_class; ++k) {
      const int64_t next = min_dist.argmax().item<int64_t>();
      chosen.push_back(idx[next].item<int64_t>());
      min_dist = torch::minimum(min_dist, (f - f[next].unsqueeze(0)).pow(2).sum(1));
    }
    picked.push_back(torch::tensor(chosen, torch::kLong));
  }
  return picked.empty() ? torch::empty({0}, torch::kLong) : torch::cat(picked);
}

torch::Tensor select_coreset(const std::string& method, const torch::Tensor& features, const torch::Tensor& labels,
                             int64_t per_class, uint64_t seed) {
  if (method == "random") return select_random(labels, per_class, seed);
  if (method == "first") return select_first(labels, per_class);
  if (method == "herding") return select_herding(features, labels, per_class);
  if (method == "kcenter") return select_kcenter(features, labels, per_class);
  throw Error(fmt::format("select_coreset: unknown method '{}' (random, first, herding, kcenter)", method));
}

LabeledImages subset(const LabeledImages& data, const torch::Tensor& indices) {
  if (!data.images.defined() || !data.labels.defined() || data.images.size(0) != data.labels.size(0)) {
    throw Error("subset: images and labels must be defined with the same N");
  }
  auto idx = indices.to(torch::kLong).cpu();
  if (idx.numel() > 0 && (idx.min().item<int64_t>() < 0 || idx.max().item<int64_t>() >= data.labels.size(0))) {
    throw Error(fmt::format("subset: index out of range [0, {})", data.labels.size(0)));
  }
  return LabeledImages{data.images.index_select(0, idx.to(data.images.device())),
                       data.labels.index_select(0, idx.to(data.labels.device())), data.class_names};
}

}  // namespace mdd
