// AutoencoderKL from a diffusers folder: config.json (every key checked; unsupported variants are
// refused by name) and diffusion_pytorch_model.{safetensors,bin}.
#include <algorithm>
#include <filesystem>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "mdd/io/safetensors.h"
#include "mdd/io/state_dict.h"
#include "mdd/io/torch_checkpoint.h"
#include "mdd/models/autoencoder_kl.h"
#include "mdd/util/error.h"
#include "models/vae_options.h"
#include "util/file_util.h"
#include "util/json_preview.h"
#include "util/json_read.h"

namespace mdd {

AutoencoderKLOptions AutoencoderKLImpl::options_from_config_json(const std::string& text, const std::string& what) {
  using nlohmann::json;
  json cfg;
  try {
    cfg = json::parse(text);
  } catch (const std::exception& e) {
    throw Error(fmt::format("{}: invalid JSON: {}", what, e.what()));
  }
  if (!cfg.is_object()) throw Error(fmt::format("{}: expected a JSON object", what));
  AutoencoderKLOptions o;
  std::vector<std::string> down_types, up_types;
  auto where = [&](const std::string& key) { return fmt::format("{}: '{}'", what, key); };
  auto get_int = [&](const std::string& key, const json& v) { return detail::json_int(v, where(key)); };
  auto get_bool = [&](const std::string& key, const json& v) { return detail::json_bool(v, where(key)); };
  for (const auto& [key, v] : cfg.items()) {
    if (key == "in_channels") {
      o.in_channels(get_int(key, v));
    } else if (key == "out_channels") {
      o.out_channels(get_int(key, v));
    } else if (key == "latent_channels") {
      o.latent_channels(get_int(key, v));
    } else if (key == "layers_per_block") {
      o.layers_per_block(get_int(key, v));
    } else if (key == "norm_num_groups") {
      o.norm_num_groups(get_int(key, v));
    } else if (key == "block_out_channels") {
      const std::vector<int64_t> ch = detail::json_int_list(v, where(key));
      if (ch.empty()) throw Error(fmt::format("{}: '{}' must be a non-empty list of integers", what, key));
      o.block_out_channels(ch);
    } else if (key == "scaling_factor") {
      o.scaling_factor(detail::json_number(v, where(key)));
    } else if (key == "sample_size") {
      // An int, or [h, w] in newer configs; we keep the larger edge (informational only).
      if (v.is_array()) {
        int64_t m = 0;
        for (const auto& e : v) m = std::max(m, get_int(key, e));
        o.sample_size(m);
      } else {
        o.sample_size(get_int(key, v));
      }
    } else if (key == "act_fn") {
      if (!v.is_string() || v.get<std::string>() != "silu")
        throw Error(fmt::format("{}: unsupported '{}' {} (only \"silu\")", what, key, detail::json_preview(v)));
    } else if (key == "down_block_types") {
      down_types = detail::json_string_list(v, where(key));
      for (const auto& t : down_types)
        if (t != "DownEncoderBlock2D")
          throw Error(fmt::format("{}: unsupported '{}' entry \"{}\" (only DownEncoderBlock2D)", what, key, t));
    } else if (key == "up_block_types") {
      up_types = detail::json_string_list(v, where(key));
      for (const auto& t : up_types)
        if (t != "UpDecoderBlock2D")
          throw Error(fmt::format("{}: unsupported '{}' entry \"{}\" (only UpDecoderBlock2D)", what, key, t));
    } else if (key == "force_upcast") {
      get_bool(key, v);  // only decides fp32 upcasting for fp16 pipelines; our dtype is explicit
    } else if (key == "use_quant_conv" || key == "use_post_quant_conv" || key == "mid_block_add_attention") {
      if (!get_bool(key, v)) throw Error(fmt::format("{}: unsupported '{}' = false", what, key));
    } else if (key == "shift_factor") {
      if (!v.is_null() && !(v.is_number() && v.get<double>() == 0.0))
        throw Error(fmt::format("{}: unsupported '{}' {} (only null or 0)", what, key, detail::json_preview(v)));
    } else if (key == "latents_mean" || key == "latents_std") {
      if (!v.is_null()) throw Error(fmt::format("{}: unsupported '{}' (only null)", what, key));
    } else if (key == "_class_name") {
      if (!v.is_string() || v.get<std::string>() != "AutoencoderKL")
        throw Error(fmt::format("{}: '{}' is {}, expected \"AutoencoderKL\"", what, key, detail::json_preview(v)));
    } else if (!key.empty() && key[0] == '_') {
      // diffusers bookkeeping (_diffusers_version, _name_or_path, ...): no effect on the model.
    } else {
      throw Error(fmt::format("{}: unknown or unsupported config key '{}'", what, key));
    }
  }
  const size_t levels = o.block_out_channels().size();
  if (!down_types.empty() && down_types.size() != levels)
    throw Error(fmt::format("{}: 'down_block_types' has {} entries but 'block_out_channels' has {}", what,
                            down_types.size(), levels));
  if (!up_types.empty() && up_types.size() != levels)
    throw Error(fmt::format("{}: 'up_block_types' has {} entries but 'block_out_channels' has {}", what,
                            up_types.size(), levels));
  try {
    vae::detail::validate_options(o);
  } catch (const Error& e) {
    throw Error(fmt::format("{}: {}", what, e.what()));
  }
  return o;
}

AutoencoderKL AutoencoderKLImpl::from_pretrained(const std::string& dir, VaeRuntimeOptions runtime) {
  namespace fs = std::filesystem;
  const fs::path root(dir);
  if (!fs::is_directory(root)) throw Error(fmt::format("AutoencoderKL::from_pretrained: '{}' is not a directory", dir));
  const fs::path config_path = root / "config.json";
  std::string text;
  try {
    text = read_text_file(config_path.string(), uint64_t(1) << 20);
  } catch (const Error& e) {
    throw Error(fmt::format("AutoencoderKL::from_pretrained: cannot read the config: {}", e.what()));
  }
  const AutoencoderKLOptions options = options_from_config_json(text, config_path.string());

  fs::path weights_path = root / "diffusion_pytorch_model.safetensors";
  io::TensorMap weights;
  if (fs::is_regular_file(weights_path)) {
    weights = io::load_safetensors(weights_path.string()).tensors;
  } else {
    weights_path = root / "diffusion_pytorch_model.bin";
    if (!fs::is_regular_file(weights_path))
      throw Error(fmt::format("AutoencoderKL::from_pretrained: '{}' has neither diffusion_pytorch_model.safetensors "
                              "nor diffusion_pytorch_model.bin", dir));
    weights = io::load_weights(weights_path.string());
  }
  AutoencoderKL vae(options, runtime);
  try {
    load_state_dict(*vae, normalize_keys(weights), /*strict=*/true);
  } catch (const Error& e) {
    throw Error(fmt::format("AutoencoderKL::from_pretrained: {}: {}", weights_path.string(), e.what()));
  }
  vae->eval();
  return vae;
}

}  // namespace mdd
