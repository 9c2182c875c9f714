#include "mdd/models/autoencoder_kl.h"

#include <algorithm>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/upsampling.h>
#include <torch/nn/modules/dropout.h>
#include <torch/version.h>

#include "mdd/io/state_dict.h"
#include "mdd/util/error.h"
#include "models/vae_options.h"
#include "models/vae_tiling.h"
#include "util/torch_compat.h"
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
class Downsample2DImpl : public torch::nn::Cloneable<Downsample2DImpl> {
 public:
  explicit Downsample2DImpl(int64_t channels) : channels_(channels) { reset(); }
  void reset() override { conv = register_module("conv", vae::conv(channels_, channels_, 3, 2, 0)); }
  torch::Tensor forward(const torch::Tensor& x) { return conv(torch::constant_pad_nd(x, {0, 1, 0, 1}, 0)); }
  torch::nn::Conv2d conv{nullptr};

 private:
  int64_t channels_;
};
TORCH_MODULE(Downsample2D);

// diffusers Upsample2D(use_conv=True): nearest x2 then a 3x3 conv (no transposed conv).
class Upsample2DImpl : public torch::nn::Cloneable<Upsample2DImpl> {
 public:
  explicit Upsample2DImpl(int64_t channels) : channels_(channels) { reset(); }
  void reset() override { conv = register_module("conv", vae::conv(channels_, channels_, 3, 1, 1)); }
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

 private:
  int64_t channels_;
};
TORCH_MODULE(Upsample2D);

// diffusers DownEncoderBlock2D: `resnets` then (except at the last level) `downsamplers.0`.
class DownEncoderBlock2DImpl : public torch::nn::Cloneable<DownEncoderBlock2DImpl> {
 public:
  DownEncoderBlock2DImpl(int64_t in, int64_t out, int64_t layers, int64_t groups, bool add_downsample)
      : in_(in), out_(out), layers_(layers), groups_(groups), add_downsample_(add_downsample) {
    reset();
  }
  void reset() override {
    resnets = register_module("resnets", torch::nn::ModuleList());
    for (int64_t i = 0; i < layers_; ++i) resnets->push_back(ResnetBlock2D(i == 0 ? in_ : out_, out_, groups_));
    if (add_downsample_) {
      downsamplers = register_module("downsamplers", torch::nn::ModuleList());
      downsamplers->push_back(Downsample2D(out_));
    }
  }
  torch::Tensor forward(torch::Tensor h) {
    for (const auto& r : *resnets) h = r->as<ResnetBlock2DImpl>()->forward(h);
    if (downsamplers)
      for (const auto& d : *downsamplers) h = d->as<Downsample2DImpl>()->forward(h);
    return h;
  }
  torch::nn::ModuleList resnets{nullptr}, downsamplers{nullptr};

 private:
  int64_t in_, out_, layers_, groups_;
  bool add_downsample_;
};
TORCH_MODULE(DownEncoderBlock2D);

// diffusers UpDecoderBlock2D: `resnets` (layers_per_block + 1) then (except last) `upsamplers.0`.
class UpDecoderBlock2DImpl : public torch::nn::Cloneable<UpDecoderBlock2DImpl> {
 public:
  UpDecoderBlock2DImpl(int64_t in, int64_t out, int64_t layers, int64_t groups, bool add_upsample)
      : in_(in), out_(out), layers_(layers), groups_(groups), add_upsample_(add_upsample) {
    reset();
  }
  void reset() override {
    resnets = register_module("resnets", torch::nn::ModuleList());
    for (int64_t i = 0; i < layers_; ++i) resnets->push_back(ResnetBlock2D(i == 0 ? in_ : out_, out_, groups_));
    if (add_upsample_) {
      upsamplers = register_module("upsamplers", torch::nn::ModuleList());
      upsamplers->push_back(Upsample2D(out_));
    }
  }
  torch::Tensor forward(torch::Tensor h) {
    for (const auto& r : *resnets) h = r->as<ResnetBlock2DImpl>()->forward(h);
    if (upsamplers)
      for (const auto& u : *upsamplers) h = u->as<Upsample2DImpl>()->forward(h);
    return h;
  }
  torch::nn::ModuleList resnets{nullptr}, upsamplers{nullptr};

 private:
  int64_t in_, out_, layers_, groups_;
  bool add_upsample_;
};
TORCH_MODULE(UpDecoderBlock2D);

}  // namespace

// ------------------------------------------------------------------------------------- blocks

ResnetBlock2DImpl::ResnetBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t groups)
    : in_channels_(in_channels), out_channels_(out_channels), groups_(groups) {
  reset();
}

void ResnetBlock2DImpl::reset() {
  norm1 = register_module("norm1", group_norm(groups_, in_channels_));
  conv1 = register_module("conv1", conv(in_channels_, out_channels_, 3, 1, 1));
  norm2 = register_module("norm2", group_norm(groups_, out_channels_));
  conv2 = register_module("conv2", conv(out_channels_, out_channels_, 3, 1, 1));
  // diffusers creates the 1x1 shortcut only when channels change; an identity otherwise.
  if (in_channels_ != out_channels_)
    conv_shortcut = register_module("conv_shortcut", conv(in_channels_, out_channels_, 1));
}

torch::Tensor ResnetBlock2DImpl::forward(const torch::Tensor& x) {
  torch::Tensor h = conv1(torch::silu(norm1(x)));
  h = conv2(torch::silu(norm2(h)));  // dropout(p=0) omitted: it is the identity
  const torch::Tensor shortcut = conv_shortcut ? conv_shortcut(x) : x;
  return shortcut + h;  // output_scale_factor = 1
}

AttentionImpl::AttentionImpl(int64_t channels, int64_t groups) : channels_(channels), groups_(groups) { reset(); }

void AttentionImpl::reset() {
  const int64_t channels = channels_;
  group_norm = register_module("group_norm", vae::group_norm(groups_, channels));
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

MidBlockImpl::MidBlockImpl(int64_t channels, int64_t groups) : channels_(channels), groups_(groups) { reset(); }

void MidBlockImpl::reset() {
  resnets = register_module("resnets", torch::nn::ModuleList());
  attentions = register_module("attentions", torch::nn::ModuleList());
  resnets->push_back(ResnetBlock2D(channels_, channels_, groups_));
  attentions->push_back(Attention(channels_, groups_));
  resnets->push_back(ResnetBlock2D(channels_, channels_, groups_));
}

torch::Tensor MidBlockImpl::forward(const torch::Tensor& x, const VaeTapFn& tap) {
  torch::Tensor h = resnets[0]->as<ResnetBlock2DImpl>()->forward(x);
  if (tap) tap("resnets.0", h);
  h = attentions[0]->as<AttentionImpl>()->forward(h);
  if (tap) tap("attentions.0", h);
  return resnets[1]->as<ResnetBlock2DImpl>()->forward(h);
}

EncoderImpl::EncoderImpl(const AutoencoderKLOptions& options) : options_(options) { reset(); }

void EncoderImpl::reset() {
  const auto& o = options_;
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

DecoderImpl::DecoderImpl(const AutoencoderKLOptions& options) : options_(options) { reset(); }

void DecoderImpl::reset() {
  const auto& o = options_;
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

AutoencoderKLImpl::AutoencoderKLImpl(AutoencoderKLOptions options_, VaeRuntimeOptions runtime_)
    : options(std::move(options_)), runtime(std::move(runtime_)) {
  vae::detail::validate_options(options);
  vae::detail::validate_runtime(runtime);
  reset();
}

void AutoencoderKLImpl::reset() {
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
  return vae::detail::tiled_apply(images, T * f, (T - O) * f, O, T - O, [this](const torch::Tensor& t) { return moments(t); });
}

torch::Tensor AutoencoderKLImpl::tiled_decode(const torch::Tensor& latents) {
  const int64_t f = downsample_factor(), T = runtime.tile_latent_size(), O = runtime.tile_overlap();
  if (latents.size(2) <= T && latents.size(3) <= T) return decode_untiled(latents);
  return vae::detail::tiled_apply(latents, T, T - O, O * f, (T - O) * f,
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
  vae::detail::validate_runtime(runtime);
  torch::Tensor m = vae::detail::sliced(images, runtime.slice_size(), [this](const torch::Tensor& x) {
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
  vae::detail::validate_runtime(runtime);
  return vae::detail::sliced(latents, runtime.slice_size(), [this](const torch::Tensor& z) {
    return (runtime.tiling() ? tiled_decode(z) : decode_untiled(z)).to(torch::kFloat32);
  });
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
