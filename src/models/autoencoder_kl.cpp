#include "mdd/models/autoencoder_kl.h"

#include <algorithm>
#include <filesystem>
#include <sstream>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/upsampling.h>
#include <torch/nn/modules/dropout.h>
#include <torch/version.h>

#include "mdd/io/state_dict.h"
#include "mdd/io/torch_checkpoint.h"
#include "mdd/util/error.h"
#include "util/torch_compat.h"
#include "util/json_preview.h"
#include "util/file_util.h"
#include "util/shape_str.h"

namespace mdd {
namespace vae {
namespace {

// Every GroupNorm of the VAE uses eps 1e-6 (diffusers passes eps=1e-6 everywhere in the VAE,
// not PyTorch's default 1e-5); forgetting this shifts outputs by ~1e-4 relative.
constexpr double kNormEps = 1e-6;

torch::nn::GroupNorm group_norm(int64_t groups, int64_t channels) {
  return torch::nn::GroupNorm(torch::nn::GroupNormOptions(groups, channels).eps(kNormEps).affine(true));
}

torch::nn::Conv2d conv(int64_t in, int64_t out, int64_t kernel, int64_t stride = 1, int64_t padding = 0) {
  return torch::nn::Conv2d(
      torch::nn::Conv2dOptions(in, out, kernel).stride(stride).padding(padding).bias(true));
}

/// Tap helper: forwards `name` prefixed, only when a tap is installed.
VaeTapFn prefixed(const VaeTapFn& tap, const std::string& prefix) {
  if (!tap) return {};
  return [tap, prefix](const std::string& name, const torch::Tensor& t) { tap(prefix + name, t); };
}

// diffusers Downsample2D(use_conv=True, padding=0): the SD VAE pads one zero column on the right
// and one zero row at the bottom (asymmetric, inherited from the CompVis code), then a stride-2 3x3
// conv with no padding. A symmetric pad-1 conv would shift the sampling grid by half a pixel.
class Downsample2DImpl : public torch::nn::Module {
 public:
  explicit Downsample2DImpl(int64_t channels) { conv = register_module("conv", vae::conv(channels, channels, 3, 2, 0)); }
  torch::Tensor forward(const torch::Tensor& x) { return conv(torch::constant_pad_nd(x, {0, 1, 0, 1}, 0)); }
  torch::nn::Conv2d conv{nullptr};
};
TORCH_MODULE(Downsample2D);

// diffusers Upsample2D(use_conv=True): nearest x2 then a 3x3 conv (no transposed conv).
class Upsample2DImpl : public torch::nn::Module {
 public:
  explicit Upsample2DImpl(int64_t channels) { conv = register_module("conv", vae::conv(channels, channels, 3, 1, 1)); }
  torch::Tensor forward(const torch::Tensor& x) {
    namespace F = torch::nn::functional;
    torch::Tensor h = x;
    // As diffusers: nearest upsampling had no bf16 kernel before torch 2.1, so go through fp32.
    const bool via_float = h.scalar_type() == torch::kBFloat16;
    if (via_float) h = h.to(torch::kFloat32);
    h = F::interpolate(h, F::InterpolateFuncOptions()
                              .scale_factor(std::vector<double>{2.0, 2.0})
                              .mode(torch::kNearest));
    if (via_float) h = h.to(torch::kBFloat16);
    return conv(h);
  }
  torch::nn::Conv2d conv{nullptr};
};
TORCH_MODULE(Upsample2D);

// diffusers DownEncoderBlock2D: `resnets` then (except at the last level) `downsamplers.0`.
class DownEncoderBlock2DImpl : public torch::nn::Module {
 public:
  DownEncoderBlock2DImpl(int64_t in, int64_t out, int64_t layers, int64_t groups, bool add_downsample) {
    resnets = register_module("resnets", torch::nn::ModuleList());
    for (int64_t i = 0; i < layers; ++i) resnets->push_back(ResnetBlock2D(i == 0 ? in : out, out, groups));
    if (add_downsample) {
      downsamplers = register_module("downsamplers", torch::nn::ModuleList());
      downsamplers->push_back(Downsample2D(out));
    }
  }
  torch::Tensor forward(torch::Tensor h) {
    for (const auto& r : *resnets) h = r->as<ResnetBlock2DImpl>()->forward(h);
    if (downsamplers)
      for (const auto& d : *downsamplers) h = d->as<Downsample2DImpl>()->forward(h);
    return h;
  }
  torch::nn::ModuleList resnets{nullptr}, downsamplers{nullptr};
};
TORCH_MODULE(DownEncoderBlock2D);

// diffusers UpDecoderBlock2D: `resnets` (layers_per_block + 1) then (except last) `upsamplers.0`.
class UpDecoderBlock2DImpl : public torch::nn::Module {
 public:
  UpDecoderBlock2DImpl(int64_t in, int64_t out, int64_t layers, int64_t groups, bool add_upsample) {
    resnets = register_module("resnets", torch::nn::ModuleList());
    for (int64_t i = 0; i < layers; ++i) resnets->push_back(ResnetBlock2D(i == 0 ? in : out, out, groups));
    if (add_upsample) {
      upsamplers = register_module("upsamplers", torch::nn::ModuleList());
      upsamplers->push_back(Upsample2D(out));
    }
  }
  torch::Tensor forward(torch::Tensor h) {
    for (const auto& r : *resnets) h = r->as<ResnetBlock2DImpl>()->forward(h);
    if (upsamplers)
      for (const auto& u : *upsamplers) h = u->as<Upsample2DImpl>()->forward(h);
    return h;
  }
  torch::nn::ModuleList resnets{nullptr}, upsamplers{nullptr};
};
TORCH_MODULE(UpDecoderBlock2D);

}  // namespace

// ------------------------------------------------------------------------------------- blocks

ResnetBlock2DImpl::ResnetBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t groups) {
  norm1 = register_module("norm1", group_norm(groups, in_channels));
  conv1 = register_module("conv1", conv(in_channels, out_channels, 3, 1, 1));
  norm2 = register_module("norm2", group_norm(groups, out_channels));
  conv2 = register_module("conv2", conv(out_channels, out_channels, 3, 1, 1));
  // diffusers creates the 1x1 shortcut only when channels change; an identity otherwise.
  if (in_channels != out_channels)
    conv_shortcut = register_module("conv_shortcut", conv(in_channels, out_channels, 1));
}

torch::Tensor ResnetBlock2DImpl::forward(const torch::Tensor& x) {
  torch::Tensor h = conv1(torch::silu(norm1(x)));
  h = conv2(torch::silu(norm2(h)));  // dropout(p=0) omitted: it is the identity
  const torch::Tensor shortcut = conv_shortcut ? conv_shortcut(x) : x;
  return shortcut + h;  // output_scale_factor = 1
}

AttentionImpl::AttentionImpl(int64_t channels, int64_t groups) {
  group_norm = register_module("group_norm", vae::group_norm(groups, channels));
  to_q = register_module("to_q", torch::nn::Linear(channels, channels));
  to_k = register_module("to_k", torch::nn::Linear(channels, channels));
  to_v = register_module("to_v", torch::nn::Linear(channels, channels));
  to_out = register_module("to_out", torch::nn::ModuleList());
  to_out->push_back(torch::nn::Linear(channels, channels));
  to_out->push_back(torch::nn::Dropout(0.0));  // keeps diffusers' indices; no parameters
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1), hh = x.size(2), ww = x.size(3);
  // [N, C, H, W] -> tokens [N, HW, C]
  const torch::Tensor h = group_norm(x).view({n, c, hh * ww}).transpose(1, 2);
  const torch::Tensor q = to_q(h), k = to_k(h), v = to_v(h);
  torch::Tensor o;
  if constexpr (compat::kHasSdpa) {
    // Fused kernels (flash / memory-efficient on CUDA) avoid the [HW, HW] score matrix; the scale
    // defaults to head_dim^-0.5 = C^-0.5 and softmax accumulates in float32, matching
    // diffusers' upcast_softmax.
    o = compat::sdpa(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1);
  } else {
    // diffusers AttnProcessor: baddbmm(empty, q, k^T, beta=0, alpha=C^-0.5), softmax in float32.
    const double scale = 1.0 / std::sqrt(static_cast<double>(c));
    torch::Tensor scores = torch::baddbmm(torch::empty({n, hh * ww, hh * ww}, q.options()), q,
                                          k.transpose(1, 2), /*beta=*/0, /*alpha=*/scale);
    torch::Tensor probs = scores.to(torch::kFloat32).softmax(-1).to(q.scalar_type());
    scores = torch::Tensor();
    o = torch::bmm(probs, v);
  }
  o = to_out[0]->as<torch::nn::LinearImpl>()->forward(o);
  o = o.transpose(1, 2).reshape({n, c, hh, ww});
  return o + x;  // residual; rescale_output_factor = 1
}

MidBlockImpl::MidBlockImpl(int64_t channels, int64_t groups) {
  resnets = register_module("resnets", torch::nn::ModuleList());
  attentions = register_module("attentions", torch::nn::ModuleList());
  resnets->push_back(ResnetBlock2D(channels, channels, groups));
  attentions->push_back(Attention(channels, groups));
  resnets->push_back(ResnetBlock2D(channels, channels, groups));
}

torch::Tensor MidBlockImpl::forward(const torch::Tensor& x, const VaeTapFn& tap) {
  torch::Tensor h = resnets[0]->as<ResnetBlock2DImpl>()->forward(x);
  if (tap) tap("resnets.0", h);
  h = attentions[0]->as<AttentionImpl>()->forward(h);
  if (tap) tap("attentions.0", h);
  return resnets[1]->as<ResnetBlock2DImpl>()->forward(h);
}

EncoderImpl::EncoderImpl(const AutoencoderKLOptions& o) {
  const auto& ch = o.block_out_channels();
  const int64_t g = o.norm_num_groups();
  conv_in = register_module("conv_in", conv(o.in_channels(), ch.front(), 3, 1, 1));
  down_blocks = register_module("down_blocks", torch::nn::ModuleList());
  int64_t out = ch.front();
  for (size_t i = 0; i < ch.size(); ++i) {
    const int64_t in = out;
    out = ch[i];
    down_blocks->push_back(DownEncoderBlock2D(in, out, o.layers_per_block(), g, i + 1 < ch.size()));
  }
  mid_block = register_module("mid_block", MidBlock(ch.back(), g));
  conv_norm_out = register_module("conv_norm_out", group_norm(g, ch.back()));
  conv_out = register_module("conv_out", conv(ch.back(), 2 * o.latent_channels(), 3, 1, 1));
}

torch::Tensor EncoderImpl::forward(const torch::Tensor& x, const VaeTapFn& tap) {
  torch::Tensor h = conv_in(x);
  for (size_t i = 0; i < down_blocks->size(); ++i) {
    h = down_blocks[i]->as<DownEncoderBlock2DImpl>()->forward(h);
    if (tap) tap(fmt::format("down_blocks.{}", i), h);
  }
  h = mid_block(h, prefixed(tap, "mid_block."));
  if (tap) tap("mid_block", h);
  h = conv_out(torch::silu(conv_norm_out(h)));
  if (tap) tap("conv_out", h);
  return h;
}

DecoderImpl::DecoderImpl(const AutoencoderKLOptions& o) {
  const auto& ch = o.block_out_channels();
  const int64_t g = o.norm_num_groups();
  conv_in = register_module("conv_in", conv(o.latent_channels(), ch.back(), 3, 1, 1));
  mid_block = register_module("mid_block", MidBlock(ch.back(), g));
  up_blocks = register_module("up_blocks", torch::nn::ModuleList());
  int64_t out = ch.back();
  for (size_t i = 0; i < ch.size(); ++i) {
    const int64_t in = out;
    out = ch[ch.size() - 1 - i];  // channels in reverse order
    up_blocks->push_back(UpDecoderBlock2D(in, out, o.layers_per_block() + 1, g, i + 1 < ch.size()));
  }
  conv_norm_out = register_module("conv_norm_out", group_norm(g, ch.front()));
  conv_out = register_module("conv_out", conv(ch.front(), o.out_channels(), 3, 1, 1));
}

torch::Tensor DecoderImpl::forward(const torch::Tensor& z, const VaeTapFn& tap) {
  torch::Tensor h = conv_in(z);
  if (tap) tap("conv_in", h);
  h = mid_block(h, prefixed(tap, "mid_block."));
  if (tap) tap("mid_block", h);
  for (size_t i = 0; i < up_blocks->size(); ++i) {
    h = up_blocks[i]->as<UpDecoderBlock2DImpl>()->forward(h);
    if (tap) tap(fmt::format("up_blocks.{}", i), h);
  }
  return conv_out(torch::silu(conv_norm_out(h)));
}

}  // namespace vae

// ------------------------------------------------------------------------------- AutoencoderKL

namespace {

void validate_options(const AutoencoderKLOptions& o) {
  const auto& ch = o.block_out_channels();
  if (ch.empty()) throw Error("AutoencoderKLOptions: block_out_channels is empty");
  for (int64_t c : ch) {
    if (c <= 0 || o.norm_num_groups() <= 0 || c % o.norm_num_groups() != 0)
      throw Error(fmt::format("AutoencoderKLOptions: block_out_channels {} must be positive multiples of "
                              "norm_num_groups {}", ch, o.norm_num_groups()));
  }
  if (o.in_channels() <= 0 || o.out_channels() <= 0 || o.latent_channels() <= 0 || o.layers_per_block() <= 0)
    throw Error(fmt::format("AutoencoderKLOptions: in_channels {}, out_channels {}, latent_channels {} and "
                            "layers_per_block {} must be positive", o.in_channels(), o.out_channels(),
                            o.latent_channels(), o.layers_per_block()));
}

void validate_runtime(const VaeRuntimeOptions& r) {
  if (r.slice_size() < 0) throw Error(fmt::format("VaeRuntimeOptions: slice_size {} < 0", r.slice_size()));
  if (r.tile_latent_size() < 1 || r.tile_overlap() < 0 || r.tile_overlap() >= r.tile_latent_size())
    throw Error(fmt::format("VaeRuntimeOptions: need tile_latent_size >= 1 and 0 <= tile_overlap < "
                            "tile_latent_size, got {} and {}", r.tile_latent_size(), r.tile_overlap()));
}

// diffusers blend_v / blend_h: over the first `extent` rows (cols) of `b`, cross-fade linearly from
// the last `extent` rows (cols) of `a`: b[y] = a[-extent + y] * (1 - y/extent) + b[y] * (y/extent).
// Modifies `b` in place, like diffusers (later blends then see the already blended tiles).
void blend(const torch::Tensor& a, torch::Tensor& b, int64_t extent, int64_t dim) {
  extent = std::min({a.size(dim), b.size(dim), extent});
  if (extent <= 0) return;
  // Weights in double, then cast, as Python computes y / extent before multiplying a float tensor.
  std::vector<int64_t> shape(4, 1);
  shape[dim] = extent;
  torch::Tensor w = (torch::arange(extent, torch::kFloat64) / static_cast<double>(extent)).view(shape);
  torch::Tensor one_minus_w = (1.0 - w).to(b.options());
  w = w.to(b.options());
  torch::Tensor b_head = b.narrow(dim, 0, extent);
  b_head.copy_(a.narrow(dim, a.size(dim) - extent, extent) * one_minus_w + b_head * w);
}

// diffusers tiled_encode / tiled_decode: tiles of `tile` input pixels every `stride` pixels, each
// mapped by `fn` (scale in->out = out_per_in); neighbours are cross-faded over `blend_extent`
// output pixels and every tile keeps its first `row_limit` output rows/cols.
torch::Tensor tiled_apply(const torch::Tensor& x, int64_t tile, int64_t stride, int64_t blend_extent,
                          int64_t row_limit, const std::function<torch::Tensor(const torch::Tensor&)>& fn) {
  const int64_t H = x.size(2), W = x.size(3);
  std::vector<std::vector<torch::Tensor>> rows;
  for (int64_t i = 0; i < H; i += stride) {
    std::vector<torch::Tensor> row;
    for (int64_t j = 0; j < W; j += stride)
      row.push_back(fn(x.narrow(2, i, std::min(tile, H - i)).narrow(3, j, std::min(tile, W - j))).contiguous());
    rows.push_back(std::move(row));
  }
  std::vector<torch::Tensor> out_rows;
  for (size_t i = 0; i < rows.size(); ++i) {
    std::vector<torch::Tensor> out_row;
    for (size_t j = 0; j < rows[i].size(); ++j) {
      torch::Tensor& t = rows[i][j];
      if (i > 0) blend(rows[i - 1][j], t, blend_extent, 2);
      if (j > 0) blend(rows[i][j - 1], t, blend_extent, 3);
      out_row.push_back(t.narrow(2, 0, std::min(row_limit, t.size(2))).narrow(3, 0, std::min(row_limit, t.size(3))));
    }
    out_rows.push_back(torch::cat(out_row, 3));
  }
  // Tiles of a finished row are no longer needed once the next row has blended against them, but
  // keeping them is at most ~(tile/stride)^2 x the output size: small next to one tile's activations.
  return torch::cat(out_rows, 2);
}

// Runs `fn` over chunks of `slice` samples (0 = all at once) and concatenates the results.
torch::Tensor sliced(const torch::Tensor& x, int64_t slice,
                     const std::function<torch::Tensor(const torch::Tensor&)>& fn) {
  const int64_t n = x.size(0);
  if (slice <= 0 || n <= slice) return fn(x);
  std::vector<torch::Tensor> parts;
  for (int64_t i = 0; i < n; i += slice) parts.push_back(fn(x.narrow(0, i, std::min(slice, n - i))));
  return torch::cat(parts, 0);
}

}  // namespace

AutoencoderKLImpl::AutoencoderKLImpl(AutoencoderKLOptions options_, VaeRuntimeOptions runtime_)
    : options(std::move(options_)), runtime(std::move(runtime_)) {
  validate_options(options);
  validate_runtime(runtime);
  encoder = register_module("encoder", vae::Encoder(options));
  decoder = register_module("decoder", vae::Decoder(options));
  const int64_t L = options.latent_channels();
  quant_conv = register_module("quant_conv", vae::conv(2 * L, 2 * L, 1));
  post_quant_conv = register_module("post_quant_conv", vae::conv(L, L, 1));
}

int64_t AutoencoderKLImpl::downsample_factor() const {
  return int64_t{1} << (options.block_out_channels().size() - 1);
}

void AutoencoderKLImpl::place(torch::Device device) {
  const torch::Dtype dt = device.is_cuda() ? runtime.dtype() : torch::kFloat32;
  if (dt != torch::kFloat32 && dt != torch::kBFloat16 && dt != torch::kHalf)
    throw Error(fmt::format("AutoencoderKL::place: unsupported compute dtype {}", c10::toString(dt)));
  to(device, dt);
}

torch::Tensor AutoencoderKLImpl::moments(const torch::Tensor& images) {
  const torch::Tensor& w = quant_conv->weight;
  torch::Tensor x = images.to(w.device(), w.scalar_type());
  torch::Tensor h = encoder(x, vae::prefixed(tap_, "encoder."));
  h = quant_conv(h);
  if (tap_) tap_("quant_conv", h);
  return h;
}

torch::Tensor AutoencoderKLImpl::decode_untiled(const torch::Tensor& latents) {
  const torch::Tensor& w = post_quant_conv->weight;
  torch::Tensor z = post_quant_conv(latents.to(w.device(), w.scalar_type()));
  if (tap_) tap_("post_quant_conv", z);
  return decoder(z, vae::prefixed(tap_, "decoder."));
}

torch::Tensor AutoencoderKLImpl::tiled_moments(const torch::Tensor& images) {
  const int64_t f = downsample_factor(), T = runtime.tile_latent_size(), O = runtime.tile_overlap();
  if (images.size(2) <= T * f && images.size(3) <= T * f) return moments(images);
  return tiled_apply(images, T * f, (T - O) * f, O, T - O, [this](const torch::Tensor& t) { return moments(t); });
}

torch::Tensor AutoencoderKLImpl::tiled_decode(const torch::Tensor& latents) {
  const int64_t f = downsample_factor(), T = runtime.tile_latent_size(), O = runtime.tile_overlap();
  if (latents.size(2) <= T && latents.size(3) <= T) return decode_untiled(latents);
  return tiled_apply(latents, T, T - O, O * f, (T - O) * f,
                     [this](const torch::Tensor& t) { return decode_untiled(t); });
}

DiagonalGaussian AutoencoderKLImpl::encode(torch::Tensor images) {
  const int64_t f = downsample_factor();
  if (!images.defined() || images.dim() != 4 || images.size(1) != options.in_channels() || images.size(0) == 0 ||
      images.size(2) == 0 || images.size(3) == 0 || images.size(2) % f != 0 || images.size(3) % f != 0)
    throw Error(fmt::format("AutoencoderKL::encode: expected images [N>0, {}, H, W] with H and W positive "
                            "multiples of {}, got shape {}", options.in_channels(), f, shape_str(images)));
  if (!images.is_floating_point())
    throw Error(fmt::format("AutoencoderKL::encode: images must be floating point in [-1, 1], got {}",
                            c10::toString(images.scalar_type())));
  validate_runtime(runtime);
  torch::Tensor m = sliced(images, runtime.slice_size(), [this](const torch::Tensor& x) {
    // float32 moments: the posterior (and exp of logvar) is always evaluated in full precision.
    return (runtime.tiling() ? tiled_moments(x) : moments(x)).to(torch::kFloat32);
  });
  return DiagonalGaussian::from_moments(m);
}

torch::Tensor AutoencoderKLImpl::decode(torch::Tensor latents) {
  if (!latents.defined() || latents.dim() != 4 || latents.size(1) != options.latent_channels() ||
      latents.size(0) == 0 || latents.size(2) == 0 || latents.size(3) == 0)
    throw Error(fmt::format("AutoencoderKL::decode: expected latents [N>0, {}, h>0, w>0], got shape {}",
                            options.latent_channels(), shape_str(latents)));
  if (!latents.is_floating_point())
    throw Error(fmt::format("AutoencoderKL::decode: latents must be floating point, got {}",
                            c10::toString(latents.scalar_type())));
  validate_runtime(runtime);
  return sliced(latents, runtime.slice_size(), [this](const torch::Tensor& z) {
    return (runtime.tiling() ? tiled_decode(z) : decode_untiled(z)).to(torch::kFloat32);
  });
}

// ------------------------------------------------------------------------------- key names

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

// ------------------------------------------------------------------------------- from_pretrained

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
  auto get_int = [&](const std::string& key, const json& v) -> int64_t {
    if (!v.is_number_integer()) throw Error(fmt::format("{}: '{}' must be an integer, got {}", what, key, detail::json_preview(v)));
    return v.get<int64_t>();
  };
  auto get_bool = [&](const std::string& key, const json& v) -> bool {
    if (!v.is_boolean()) throw Error(fmt::format("{}: '{}' must be true or false, got {}", what, key, detail::json_preview(v)));
    return v.get<bool>();
  };
  std::vector<std::string> down_types, up_types;
  auto get_str_list = [&](const std::string& key, const json& v) {
    if (!v.is_array()) throw Error(fmt::format("{}: '{}' must be a list of strings", what, key));
    std::vector<std::string> r;
    for (const auto& e : v) {
      if (!e.is_string()) throw Error(fmt::format("{}: '{}' must be a list of strings", what, key));
      r.push_back(e.get<std::string>());
    }
    return r;
  };
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
      if (!v.is_array() || v.empty()) throw Error(fmt::format("{}: '{}' must be a non-empty list of integers", what, key));
      std::vector<int64_t> ch;
      for (const auto& e : v) ch.push_back(get_int(key, e));
      o.block_out_channels(ch);
    } else if (key == "scaling_factor") {
      if (!v.is_number()) throw Error(fmt::format("{}: '{}' must be a number, got {}", what, key, detail::json_preview(v)));
      o.scaling_factor(v.get<double>());
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
      down_types = get_str_list(key, v);
      for (const auto& t : down_types)
        if (t != "DownEncoderBlock2D")
          throw Error(fmt::format("{}: unsupported '{}' entry \"{}\" (only DownEncoderBlock2D)", what, key, t));
    } else if (key == "up_block_types") {
      up_types = get_str_list(key, v);
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
    validate_options(o);
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

// ------------------------------------------------------------------------------- VaeCodec

VaeCodec::VaeCodec(AutoencoderKL vae, torch::Device device) : vae_(std::move(vae)) {
  if (!vae_) throw Error("VaeCodec: empty AutoencoderKL");
  vae_->place(device);
  vae_->eval();
}

DiagonalGaussian VaeCodec::encode(const torch::Tensor& images) {
  torch::NoGradGuard no_grad;  // the VAE is frozen: never keep its activations for backward
  return vae_->encode(images);
}

torch::Tensor VaeCodec::decode(const torch::Tensor& latents) {
  torch::NoGradGuard no_grad;
  return vae_->decode(latents);
}

double VaeCodec::scaling_factor() const { return vae_->options.scaling_factor(); }

std::vector<int64_t> VaeCodec::latent_shape(const std::vector<int64_t>& s) const {
  const int64_t f = vae_->downsample_factor();
  if (s.size() != 3 || s[0] != vae_->options.in_channels() || s[1] <= 0 || s[2] <= 0 || s[1] % f != 0 ||
      s[2] % f != 0)
    throw Error(fmt::format("VaeCodec::latent_shape: expected [{}, H, W] with H, W positive multiples of {}, got {}",
                            vae_->options.in_channels(), f, s));
  return {vae_->options.latent_channels(), s[1] / f, s[2] / f};
}

}  // namespace mdd
