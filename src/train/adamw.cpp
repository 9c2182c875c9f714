#include "mdd/train/adamw.h"

#include <cmath>

#include <torch/torch.h>

#include "mdd/util/error.h"

namespace mdd {

AdamW::AdamW(std::vector<torch::Tensor> params, AdamWOptions options)
    : params_(std::move(params)), slots_(params_.size()), options_(options) {
  for (size_t i = 0; i < params_.size(); ++i)
    if (!params_[i].defined()) throw Error("AdamW: parameter " + std::to_string(i) + " is undefined");
  if (!(options_.lr() >= 0) || !(options_.weight_decay() >= 0) || !(options_.beta1() >= 0 && options_.beta1() < 1) ||
      !(options_.beta2() >= 0 && options_.beta2() < 1) || !(options_.eps() > 0))
    throw Error("AdamW: invalid options (need lr >= 0, weight_decay >= 0, 0 <= beta < 1, eps > 0)");
}

void AdamW::zero_grad() {
  for (auto& p : params_) {
    if (p.grad().defined()) p.mutable_grad() = torch::Tensor();
  }
}

void AdamW::step() {
  torch::NoGradGuard no_grad;
  const double lr = options_.lr(), b1 = options_.beta1(), b2 = options_.beta2();
  for (size_t i = 0; i < params_.size(); ++i) {
    auto& p = params_[i];
    const auto& g = p.grad();
    if (!g.defined()) continue;
    Slot& s = slots_[i];
    if (!s.exp_avg.defined()) {
      s.exp_avg = torch::zeros_like(p, torch::MemoryFormat::Preserve);
      s.exp_avg_sq = torch::zeros_like(p, torch::MemoryFormat::Preserve);
    }
    s.step += 1;
    // Same operation order as PyTorch's _single_tensor_adamw, so results agree to rounding.
    if (options_.weight_decay() != 0) p.mul_(1.0 - lr * options_.weight_decay());
    s.exp_avg.mul_(b1).add_(g, 1.0 - b1);
    s.exp_avg_sq.mul_(b2).addcmul_(g, g, 1.0 - b2);
    const double bc1 = 1.0 - std::pow(b1, double(s.step));
    const double bc2 = 1.0 - std::pow(b2, double(s.step));
    const double step_size = lr / bc1;
    auto denom = (s.exp_avg_sq.sqrt() / std::sqrt(bc2)).add_(options_.eps());
    p.addcdiv_(s.exp_avg, denom, -step_size);
  }
}

std::map<std::string, torch::Tensor> AdamW::state(const std::string& prefix) const {
  std::map<std::string, torch::Tensor> out;
  for (size_t i = 0; i < slots_.size(); ++i) {
    const Slot& s = slots_[i];
    if (!s.exp_avg.defined()) continue;
    const std::string k = prefix + std::to_string(i);
    out[k + ".step"] = torch::tensor(s.step, torch::kInt64);
    out[k + ".exp_avg"] = s.exp_avg.detach();
    out[k + ".exp_avg_sq"] = s.exp_avg_sq.detach();
  }
  return out;
}

void AdamW::load_state(const std::map<std::string, torch::Tensor>& state, const std::string& prefix) {
  std::vector<Slot> slots(params_.size());
  for (const auto& kv : state) {
    if (kv.first.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string rest = kv.first.substr(prefix.size());
    const auto dot = rest.find('.');
    if (dot == std::string::npos || dot == 0) throw Error("AdamW state: malformed key '" + kv.first + "'");
    size_t idx = 0;
    try {
      size_t used = 0;
      idx = std::stoul(rest.substr(0, dot), &used);
      if (used != dot) throw std::invalid_argument("x");
    } catch (const std::exception&) {
      throw Error("AdamW state: malformed key '" + kv.first + "'");
    }
    if (idx >= params_.size())
      throw Error("AdamW state: key '" + kv.first + "' names parameter " + std::to_string(idx) + " of " +
                  std::to_string(params_.size()));
    const std::string field = rest.substr(dot + 1);
    const auto& p = params_[idx];
    if (field == "step") {
      if (kv.second.numel() != 1) throw Error("AdamW state: '" + kv.first + "' must be a scalar");
      slots[idx].step = kv.second.to(torch::kInt64).item<int64_t>();
    } else if (field == "exp_avg" || field == "exp_avg_sq") {
      if (kv.second.sizes() != p.sizes())
        throw Error("AdamW state: '" + kv.first + "' has shape " + c10::str(kv.second.sizes()) + ", parameter has " +
                    c10::str(p.sizes()));
      auto t = kv.second.to(p.options()).clone();
      (field == "exp_avg" ? slots[idx].exp_avg : slots[idx].exp_avg_sq) = t;
    } else {
      throw Error("AdamW state: unknown field in key '" + kv.first + "'");
    }
  }
  for (size_t i = 0; i < slots.size(); ++i)
    if (slots[i].exp_avg.defined() != slots[i].exp_avg_sq.defined() || (slots[i].exp_avg.defined() && slots[i].step <= 0))
      throw Error("AdamW state: parameter " + std::to_string(i) + " has an incomplete state");
  slots_ = std::move(slots);
}

void AdamW::set_lr(double lr) {
  if (!(lr >= 0) || !std::isfinite(lr)) throw Error("AdamW::set_lr: lr must be finite and >= 0, got " + std::to_string(lr));
  options_.lr(lr);
}

}  // namespace mdd
