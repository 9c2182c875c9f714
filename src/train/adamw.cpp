#include "mdd/train/adamw.h"

#include <cmath>

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include "mdd/util/error.h"
#include "util/cpu_kernels.h"

namespace mdd {
namespace {

// The update of one float32 CPU parameter in one pass over p, g, m, v (the op-by-op form makes
// seven passes and two parameter-sized temporaries; for DiT-S/2 that was a large part of a step).
// Each element goes through the same operations in the same order as the op-by-op form, so the
// two agree to rounding (ATen's vector kernels fuse some multiply-adds; this loop does not).
struct AdamWArgs {
  float* p;
  const float* g;
  float* m;
  float* v;
  float decay_mul, b1, one_minus_b1, b2, one_minus_b2, sqrt_bc2, eps, neg_step;
};

// This file is compiled with -fno-math-errno (CMakeLists.txt): sqrt of v >= 0 never sets errno,
// and without errno semantics the loop vectorises.
MDD_CPU_CLONES_AVX512 void adamw_range(const AdamWArgs& a, int64_t begin, int64_t end) {
  float* __restrict pp = a.p;
  float* __restrict mp = a.m;
  float* __restrict vp = a.v;
  const float* __restrict gp = a.g;
  for (int64_t i = begin; i < end; ++i) {
    const float p = pp[i] * a.decay_mul;  // decay_mul 1 without weight decay: exact
    float m = mp[i] * a.b1;
    m = m + a.one_minus_b1 * gp[i];
    float v = vp[i] * a.b2;
    v = v + (a.one_minus_b2 * gp[i]) * gp[i];
    const float denom = std::sqrt(v) / a.sqrt_bc2 + a.eps;
    pp[i] = p + a.neg_step * (m / denom);
    mp[i] = m;
    vp[i] = v;
  }
}

bool fusable(const torch::Tensor& p, const torch::Tensor& g, const torch::Tensor& m, const torch::Tensor& v) {
  for (const auto* t : {&p, &g, &m, &v})
    if (!t->device().is_cpu() || t->scalar_type() != torch::kFloat32 || !t->is_contiguous() || t->is_sparse())
      return false;
  return g.numel() == p.numel();
}

}  // namespace

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
    const double bc1 = 1.0 - std::pow(b1, double(s.step));
    const double bc2 = 1.0 - std::pow(b2, double(s.step));
    const double step_size = lr / bc1;
    if (fusable(p, g, s.exp_avg, s.exp_avg_sq)) {
      const AdamWArgs a{p.data_ptr<float>(),
                        g.data_ptr<float>(),
                        s.exp_avg.data_ptr<float>(),
                        s.exp_avg_sq.data_ptr<float>(),
                        static_cast<float>(options_.weight_decay() != 0 ? 1.0 - lr * options_.weight_decay() : 1.0),
                        static_cast<float>(b1),
                        static_cast<float>(1.0 - b1),
                        static_cast<float>(b2),
                        static_cast<float>(1.0 - b2),
                        static_cast<float>(std::sqrt(bc2)),
                        static_cast<float>(options_.eps()),
                        static_cast<float>(-step_size)};
      at::parallel_for(0, p.numel(), 16384, [&](int64_t b, int64_t e) { adamw_range(a, b, e); });
      continue;
    }
    // Same operation order as PyTorch's _single_tensor_adamw, so results agree to rounding.
    if (options_.weight_decay() != 0) p.mul_(1.0 - lr * options_.weight_decay());
    s.exp_avg.mul_(b1).add_(g, 1.0 - b1);
    s.exp_avg_sq.mul_(b2).addcmul_(g, g, 1.0 - b2);
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
