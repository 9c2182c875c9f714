#include "mdd/models/difffit.h"

#include <algorithm>

#include <fmt/format.h>
#include <torch/torch.h>

#include "mdd/util/error.h"

namespace mdd {

bool is_difffit_trainable(const std::string& name) {
  // DiffFit-pytorch mark_difffit_trainable: any(kw in name for kw in [...]). "norm" matches
  // nothing in DiT (its LayerNorms have no affine parameters) but is kept for other backbones.
  for (const char* kw : {"bias", "norm", "gamma", "y_embed"})
    if (name.find(kw) != std::string::npos) return true;
  return false;
}

bool has_difffit(const DiT& model) {
  for (int64_t i = 0; i < model->options().depth(); ++i)
    if (model->block(i)->has_gammas()) return true;
  return false;
}

void apply_difffit(DiT& model, const DiffFitOptions& options) {
  if (options.gamma_blocks() < 0)
    throw Error(fmt::format("apply_difffit: gamma_blocks must be >= 0, got {}", options.gamma_blocks()));
  if (has_difffit(model))
    throw Error("apply_difffit: the model already has DiffFit gammas (apply_difffit called twice?)");
  const int64_t n = std::min(options.gamma_blocks(), model->options().depth());
  for (int64_t i = 0; i < n; ++i) model->block(i)->enable_gammas();
  for (auto& p : model->named_parameters(/*recurse=*/true)) p.value().set_requires_grad(is_difffit_trainable(p.key()));
}

std::vector<torch::Tensor> trainable_parameters(const torch::nn::Module& module) {
  std::vector<torch::Tensor> out;
  for (const auto& p : module.parameters(/*recurse=*/true))
    if (p.requires_grad()) out.push_back(p);
  return out;
}

}  // namespace mdd
