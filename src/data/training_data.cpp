#include "mdd/data/training_data.h"

#include <fmt/format.h>
#include <torch/torch.h>

#include "mdd/util/error.h"
#include "util/splitmix.h"

namespace mdd {
LatentTrainingData::LatentTrainingData(LatentCache cache, int64_t num_classes, std::vector<int64_t> model_labels_of_class,
                                       torch::Tensor subset)
    : cache_(std::move(cache)), num_classes_(num_classes), model_labels_(std::move(model_labels_of_class)) {
  if (cache_.size() == 0) throw Error("LatentTrainingData: the latent cache is empty");
  if (num_classes_ <= 0) throw Error("LatentTrainingData: num_classes must be > 0");
  if (model_labels_.empty())
    for (int64_t c = 0; c < num_classes_; ++c) model_labels_.push_back(c);
  if (int64_t(model_labels_.size()) != num_classes_)
    throw Error(fmt::format("LatentTrainingData: {} model labels for {} classes", model_labels_.size(), num_classes_));
  for (auto l : model_labels_)
    if (l < 0) throw Error(fmt::format("LatentTrainingData: negative model label {}", l));
  model_label_map_ = torch::tensor(model_labels_, torch::kInt64);
  subset_ = subset.defined() ? subset.to(torch::kCPU, torch::kInt64).contiguous()
                             : torch::arange(cache_.size(), torch::kInt64);
  if (subset_.dim() != 1 || subset_.numel() == 0) throw Error("LatentTrainingData: empty subset");
  if (subset_.min().item<int64_t>() < 0 || subset_.max().item<int64_t>() >= cache_.size())
    throw Error(fmt::format("LatentTrainingData: subset index out of range [0, {})", cache_.size()));
  labels_ = cache_.labels().index_select(0, subset_).contiguous();
  if (labels_.min().item<int64_t>() < 0 || labels_.max().item<int64_t>() >= num_classes_)
    throw Error(fmt::format("LatentTrainingData: labels must lie in [0, {})", num_classes_));
}

int64_t LatentTrainingData::size() const { return subset_.size(0); }

std::vector<int64_t> LatentTrainingData::latent_shape() const {
  auto s = cache_.mean().sizes().vec();
  return {s.begin() + 2, s.end()};
}

LatentBatch LatentTrainingData::batch(const torch::Tensor& indices, torch::Generator& generator) const {
  if (!indices.defined() || indices.dim() != 1) throw Error("LatentTrainingData::batch: indices must be int64 [B]");
  const torch::Tensor idx = indices.to(torch::kCPU, torch::kInt64);
  if (idx.numel() > 0 && (idx.min().item<int64_t>() < 0 || idx.max().item<int64_t>() >= size()))
    throw Error(fmt::format("LatentTrainingData::batch: index out of range [0, {})", size()));
  LatentBatch b;
  b.indices = idx;
  b.labels = labels_.index_select(0, idx);
  b.latents = cache_.sample(subset_.index_select(0, idx), generator);
  b.model_labels = model_label_map_.index_select(0, b.labels);
  return b;
}

torch::Tensor finetune_subset(const torch::Tensor& labels, int64_t ipc) {
  if (!labels.defined() || labels.dim() != 1) throw Error("finetune_subset: labels must be int64 [N]");
  const torch::Tensor l = labels.to(torch::kCPU, torch::kInt64).contiguous();
  const int64_t n = l.size(0);
  if (ipc <= 0) return torch::arange(n, torch::kInt64);
  const auto* p = l.data_ptr<int64_t>();
  std::map<int64_t, int64_t> taken;
  std::vector<int64_t> out;
  for (int64_t i = 0; i < n; ++i)
    if (taken[p[i]]++ < ipc) out.push_back(i);
  for (const auto& kv : taken)
    if (kv.second < ipc)
      throw Error(fmt::format("finetune_subset: class {} has {} items, fewer than finetune_ipc = {}", kv.first, kv.second, ipc));
  return torch::tensor(out, torch::kInt64);
}

torch::Tensor epoch_order(int64_t size, uint64_t seed, int64_t epoch) {
  if (size <= 0) throw Error("epoch_order: size must be > 0");
  auto gen = at::detail::createCPUGenerator(splitmix64(seed ^ splitmix64(0x5EEDull + uint64_t(epoch))));
  return torch::randperm(size, gen, torch::kInt64);
}

}  // namespace mdd
