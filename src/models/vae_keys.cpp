// AutoencoderKL's key migration: checkpoints saved by older diffusers (attention "query"/"key"/
// "value"/"proj_attn", CompVis-converted 1x1-conv projections) load under today's names.
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "mdd/models/autoencoder_kl.h"
#include "mdd/util/error.h"

namespace mdd {

io::TensorMap AutoencoderKLImpl::normalize_keys(const io::TensorMap& weights) {
  static const std::map<std::string, std::string> kOldToNew = {
      {"query", "to_q"}, {"key", "to_k"}, {"value", "to_v"}, {"proj_attn", "to_out.0"}};
  io::TensorMap out;
  for (const auto& [key, value] : weights) {
    // Split into dotted components and rename the component after "attentions.<i>".
    std::vector<std::string> parts;
    {
      std::stringstream ss(key);
      std::string p;
      while (std::getline(ss, p, '.')) parts.push_back(p);
    }
    std::string new_key = key;
    bool is_attn_proj = false;
    for (size_t k = 0; k + 2 < parts.size(); ++k) {
      if (parts[k] != "attentions") continue;
      std::string& leaf = parts[k + 2];
      auto it = kOldToNew.find(leaf);
      if (it != kOldToNew.end()) leaf = it->second;
      is_attn_proj = leaf == "to_q" || leaf == "to_k" || leaf == "to_v" || leaf == "to_out.0" ||
                     (leaf == "to_out" && k + 3 < parts.size() && parts[k + 3] == "0");
      new_key.clear();
      for (size_t i = 0; i < parts.size(); ++i) new_key += (i ? "." : "") + parts[i];
      break;
    }
    torch::Tensor t = value;
    // Checkpoints converted from the CompVis layout store the attention projections as 1x1 convs
    // [C, C, 1, 1]; a Linear holds the same numbers as [C, C].
    if (is_attn_proj && t.defined() && t.dim() == 4 && t.size(2) == 1 && t.size(3) == 1)
      t = t.reshape({t.size(0), t.size(1)});
    if (out.count(new_key))
      throw Error(fmt::format("AutoencoderKL::normalize_keys: '{}' maps to '{}', which is already present "
                              "(old and new attention names mixed?)", key, new_key));
    out.emplace(new_key, t);
  }
  return out;
}

}  // namespace mdd
