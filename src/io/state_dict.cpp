#include "mdd/io/state_dict.h"

#include <sstream>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "mdd/util/error.h"

namespace mdd {
namespace io {

std::string LoadReport::to_string() const {
  std::ostringstream os;
  auto list = [&](const char* what, const std::vector<std::string>& keys) {
    if (keys.empty()) return;
    os << keys.size() << ' ' << what << ":";
    for (const auto& k : keys) os << "\n  " << k;
    os << '\n';
  };
  list("missing key(s) (in the module, not in the weights)", missing);
  list("unexpected key(s) (in the weights, not in the module)", unexpected);
  list("shape mismatch(es)", mismatched);
  return ok() ? std::string("all keys matched") : os.str();
}

io::TensorMap state_dict(const torch::nn::Module& module) {
  io::TensorMap out;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) out.emplace(p.key(), p.value().detach());
  for (const auto& b : module.named_buffers(/*recurse=*/true)) out.emplace(b.key(), b.value().detach());
  return out;
}

LoadReport load_state_dict(torch::nn::Module& module, const io::TensorMap& weights, bool strict) {
  LoadReport report;
  std::vector<std::pair<torch::Tensor, const torch::Tensor*>> copies;
  const io::TensorMap own = state_dict(module);
  for (const auto& [key, dst] : own) {
    auto it = weights.find(key);
    if (it == weights.end()) {
      report.missing.push_back(key);
      continue;
    }
    if (!it->second.defined() || it->second.sizes() != dst.sizes()) {
      report.mismatched.push_back(fmt::format("{}: module {} vs weights {}", key, dst.sizes().vec(),
                                              it->second.defined() ? it->second.sizes().vec() : std::vector<int64_t>{}));
      continue;
    }
    copies.emplace_back(dst, &it->second);
  }
  for (const auto& kv : weights)
    if (!own.count(kv.first)) report.unexpected.push_back(kv.first);
  if (strict && !report.ok()) throw Error("load_state_dict (strict): " + report.to_string());
  torch::NoGradGuard no_grad;
  for (auto& [dst, src] : copies) dst.copy_(*src);
  return report;
}

}  // namespace io
}  // namespace mdd
