#pragma once
/// \file
/// The Stable Diffusion VAE (diffusers `AutoencoderKL`, as in stabilityai/sd-vae-ft-ema|mse), with
/// diffusers' parameter names so released weights load strictly, plus memory-bounded encode/decode
/// (batch slicing, spatial tiling) and a `Codec` adapter.

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include "mdd/export.h"
#include "mdd/io/safetensors.h"
#include "mdd/models/codec.h"
#include "mdd/util/option_check.h"

namespace mdd {

/// Architecture of an `AutoencoderKL` (the fields of a diffusers `config.json`). Defaults are the
/// sd-vae-ft-ema / sd-vae-ft-mse configuration (83,653,863 parameters, latent = image / 8).
struct MDD_API AutoencoderKLOptions {
  /// Image channels in.
  TORCH_ARG(int64_t, in_channels) = 3;
  /// Image channels out.
  TORCH_ARG(int64_t, out_channels) = 3;
  /// Latent channels L (the encoder emits 2L moments: mean and log-variance).
  TORCH_ARG(int64_t, latent_channels) = 4;
  /// Channels of each resolution level; the spatial downsampling factor is 2^(size-1).
  TORCH_ARG(std::vector<int64_t>, block_out_channels) = std::vector<int64_t>{128, 256, 512, 512};
  /// ResnetBlock2Ds per encoder level (the decoder uses one more per level, as diffusers).
  TORCH_ARG(int64_t, layers_per_block) = 2;
  /// Groups of every GroupNorm (which all use eps 1e-6).
  TORCH_ARG(int64_t, norm_num_groups) = 32;
  /// Latent scale used by the diffusion model; NOT applied inside encode/decode (see VaeCodec).
  TORCH_ARG(double, scaling_factor) = 0.18215;
  /// Training image size from config.json (informational; diffusers derives its tile size from it).
  TORCH_ARG(int64_t, sample_size) = 256;
};

/// The rules `AutoencoderKL` applies to its architecture (positive sizes, channel counts that are
/// multiples of norm_num_groups); each broken one goes to `fail`.
MDD_API void check_options(const AutoencoderKLOptions& o, const OptionFail& fail);

/// How encode/decode spend memory and precision. None of these change the parameters, and
/// slicing never changes results; tiling approximates the untiled result (see docs/vae.md).
struct MDD_API VaeRuntimeOptions {
  /// Images (or latents) per chunk of the batch; 0 = the whole batch at once. Per-sample results
  /// are independent of the chunking (GroupNorm normalises per sample), so this only bounds memory.
  TORCH_ARG(int64_t, slice_size) = 16;
  /// Split large inputs into overlapping spatial tiles (diffusers `enable_tiling`). Only inputs
  /// larger than one tile are tiled. Tiles see their own GroupNorm statistics and attention context,
  /// so results differ from the untiled pass (smoothly blended seams).
  TORCH_ARG(bool, tiling) = false;
  /// Tile edge in LATENT pixels (image tiles are this times the downsampling factor). The default
  /// 32 equals diffusers' sd-vae setting (sample_size 256 / 8).
  TORCH_ARG(int64_t, tile_latent_size) = 32;
  /// Overlap of neighbouring tiles in LATENT pixels (diffusers: 0.25 * tile = 8). Must be smaller than
  /// the tile. The overlap is blended with linear ramps exactly like diffusers' blend_v/blend_h.
  TORCH_ARG(int64_t, tile_overlap) = 8;
  /// Compute dtype used by `AutoencoderKLImpl::place` on CUDA devices (kFloat32, kBFloat16 or
  /// kHalf). On CPU the VAE always stays float32 (the reference runs the VAE in fp32).
  TORCH_ARG(torch::Dtype, dtype) = torch::kFloat32;
};

/// Debug hook: called with a module path relative to the AutoencoderKL (e.g.
/// "encoder.mid_block.attentions.0") and that submodule's output, like a PyTorch forward hook.
using VaeTapFn = std::function<void(const std::string& path, const torch::Tensor& output)>;

/// Building blocks of the VAE. Names and parameter keys follow diffusers.
namespace vae {

/// diffusers ResnetBlock2D without time embedding: shortcut(x) + conv2(SiLU(GN2(conv1(SiLU(GN1(x)))))).
/// `conv_shortcut` (1x1) exists only when in_channels != out_channels.
class MDD_API ResnetBlock2DImpl : public torch::nn::Cloneable<ResnetBlock2DImpl> {
 public:
  /// `groups` GroupNorm groups (eps 1e-6).
  ResnetBlock2DImpl(int64_t in_channels, int64_t out_channels, int64_t groups);
  /// (Re)creates the submodules (what `clone()` calls on the copy).
  void reset() override;
  /// [N, in, H, W] -> [N, out, H, W].
  torch::Tensor forward(const torch::Tensor& x);
  torch::nn::GroupNorm norm1{nullptr}, norm2{nullptr};
  torch::nn::Conv2d conv1{nullptr}, conv2{nullptr}, conv_shortcut{nullptr};

 private:
  int64_t in_channels_, out_channels_, groups_;
};
/// Module holder of ResnetBlock2DImpl.
TORCH_MODULE(ResnetBlock2D);

/// Single-head spatial self-attention with a GroupNorm and a residual (diffusers Attention as built
/// for the VAE mid block: heads = 1, head dim = C, softmax in float32).
class MDD_API AttentionImpl : public torch::nn::Cloneable<AttentionImpl> {
 public:
  /// `channels` C, `groups` GroupNorm groups (eps 1e-6).
  AttentionImpl(int64_t channels, int64_t groups);
  /// (Re)creates the submodules.
  void reset() override;
  /// [N, C, H, W] -> [N, C, H, W].
  torch::Tensor forward(const torch::Tensor& x);
  torch::nn::GroupNorm group_norm{nullptr};
  torch::nn::Linear to_q{nullptr}, to_k{nullptr}, to_v{nullptr};
  /// Holds the output Linear at index 0 (key `to_out.0`); diffusers' index 1 is a parameterless Dropout.
  torch::nn::ModuleList to_out{nullptr};

 private:
  int64_t channels_, groups_;
};
/// Module holder of AttentionImpl.
TORCH_MODULE(Attention);

/// resnets.0 -> attentions.0 -> resnets.1 at constant channels (diffusers UNetMidBlock2D, no temb).
class MDD_API MidBlockImpl : public torch::nn::Cloneable<MidBlockImpl> {
 public:
  /// `channels` C, `groups` GroupNorm groups.
  MidBlockImpl(int64_t channels, int64_t groups);
  /// (Re)creates the submodules.
  void reset() override;
  /// `tap` (optional) receives "resnets.0" and "attentions.0" outputs.
  torch::Tensor forward(const torch::Tensor& x, const VaeTapFn& tap = {});
  torch::nn::ModuleList resnets{nullptr}, attentions{nullptr};

 private:
  int64_t channels_, groups_;
};
/// Module holder of MidBlockImpl.
TORCH_MODULE(MidBlock);

/// The VAE encoder: conv_in, down_blocks (resnets + asymmetric-pad stride-2 downsamplers),
/// mid_block, conv_norm_out, SiLU, conv_out (-> 2 * latent_channels moments).
class MDD_API EncoderImpl : public torch::nn::Cloneable<EncoderImpl> {
 public:
  /// Built from the architecture options.
  explicit EncoderImpl(const AutoencoderKLOptions& options);
  /// (Re)creates the submodules.
  void reset() override;
  /// Images [N, in_channels, H, W] -> moments [N, 2L, H/f, W/f] (before quant_conv).
  torch::Tensor forward(const torch::Tensor& x, const VaeTapFn& tap = {});
  torch::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  torch::nn::ModuleList down_blocks{nullptr};
  MidBlock mid_block{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};

 private:
  AutoencoderKLOptions options_;
};
/// Module holder of EncoderImpl.
TORCH_MODULE(Encoder);

/// The VAE decoder: conv_in, mid_block, up_blocks (layers_per_block + 1 resnets, nearest x2 +
/// conv upsamplers, reversed channels), conv_norm_out, SiLU, conv_out. No output clamp.
class MDD_API DecoderImpl : public torch::nn::Cloneable<DecoderImpl> {
 public:
  /// Built from the architecture options.
  explicit DecoderImpl(const AutoencoderKLOptions& options);
  /// (Re)creates the submodules.
  void reset() override;
  /// Latents after post_quant_conv [N, L, h, w] -> images [N, out_channels, h*f, w*f].
  torch::Tensor forward(const torch::Tensor& z, const VaeTapFn& tap = {});
  torch::nn::Conv2d conv_in{nullptr}, conv_out{nullptr};
  MidBlock mid_block{nullptr};
  torch::nn::ModuleList up_blocks{nullptr};
  torch::nn::GroupNorm conv_norm_out{nullptr};

 private:
  AutoencoderKLOptions options_;
};
/// Module holder of DecoderImpl.
TORCH_MODULE(Decoder);

}  // namespace vae

class AutoencoderKL;

/// diffusers AutoencoderKL: encode = DiagonalGaussian(quant_conv(encoder(x))), decode =
/// decoder(post_quant_conv(z)). Neither applies `scaling_factor` (the caller does, as DiT does).
/// encode/decode run in the dtype and on the device of the parameters (inputs are moved there);
/// their results are float32. Gradients follow the caller's grad mode.
class MDD_API AutoencoderKLImpl : public torch::nn::Cloneable<AutoencoderKLImpl> {
 public:
  /// Builds the architecture with PyTorch-default initialisation (load weights afterwards).
  explicit AutoencoderKLImpl(AutoencoderKLOptions options = {}, VaeRuntimeOptions runtime = {});
  /// (Re)creates the submodules from `options`. `clone()` (from `torch::nn::Cloneable`) calls it on
  /// the copy and then copies every parameter and buffer, so `vae->clone()` is an independent deep
  /// copy (options, runtime settings and tap included), e.g. for an EMA of a VAE being trained.
  void reset() override;

  /// Posterior over unscaled latents for images in [-1, 1], [N, in_channels, H, W] with H and W
  /// multiples of `downsample_factor()`. Honours `runtime.slice_size` and `runtime.tiling`.
  DiagonalGaussian encode(torch::Tensor images);
  /// Images (roughly [-1, 1], unclamped) from unscaled latents [N, latent_channels, h, w].
  /// Honours `runtime.slice_size` and `runtime.tiling`.
  torch::Tensor decode(torch::Tensor latents);
  /// quant_conv(encoder(images)) for one chunk, no slicing/tiling: the raw 2L moments.
  torch::Tensor moments(const torch::Tensor& images);
  /// decoder(post_quant_conv(latents)) for one chunk, no slicing/tiling.
  torch::Tensor decode_untiled(const torch::Tensor& latents);

  /// Maps diffusers' pre-0.17 attention names (query/key/value/proj_attn) to the current ones
  /// (to_q/to_k/to_v/to_out.0); reshapes 1x1-conv-shaped attention weights [C,C,1,1] to [C,C].
  /// Current names pass through. Throws mdd::Error if an old and a new name collide.
  static io::TensorMap normalize_keys(const io::TensorMap& weights);

  /// Reads a diffusers model folder: `config.json` (unknown or unsupported entries throw mdd::Error
  /// naming the key) and `diffusion_pytorch_model.safetensors` (preferred) or `.bin`; keys are
  /// normalised and loaded strictly. The result is float32 on CPU in eval mode.
  static AutoencoderKL from_pretrained(const std::string& dir, VaeRuntimeOptions runtime = {});
  /// Parses the text of a diffusers config.json into options (same validation as from_pretrained;
  /// `what` names the source in messages).
  static AutoencoderKLOptions options_from_config_json(const std::string& json_text,
                                                       const std::string& what = "config.json");

  /// Spatial factor between image and latent (2^(levels-1) = 8 for the default config).
  int64_t downsample_factor() const;
  /// Moves the module to `device` in the compute dtype: `runtime.dtype` on CUDA, float32 on CPU.
  void place(torch::Device device);
  /// Installs (or with {} removes) a debug tap called for the main submodules' outputs.
  void set_tap(VaeTapFn tap) { tap_ = std::move(tap); }

  /// Architecture.
  AutoencoderKLOptions options;
  /// Memory/precision settings of encode/decode; may be changed at any time.
  VaeRuntimeOptions runtime;

  vae::Encoder encoder{nullptr};
  vae::Decoder decoder{nullptr};
  torch::nn::Conv2d quant_conv{nullptr}, post_quant_conv{nullptr};

 private:
  torch::Tensor tiled_moments(const torch::Tensor& images);
  torch::Tensor tiled_decode(const torch::Tensor& latents);
  VaeTapFn tap_;
};

/// Module holder of AutoencoderKLImpl; equivalent to `TORCH_MODULE(AutoencoderKL)` plus
/// `AutoencoderKL::from_pretrained`.
class MDD_API AutoencoderKL : public torch::nn::ModuleHolder<AutoencoderKLImpl> {
 public:
  using torch::nn::ModuleHolder<AutoencoderKLImpl>::ModuleHolder;
  using Impl = AutoencoderKLImpl;
  /// See AutoencoderKLImpl::from_pretrained.
  static AutoencoderKL from_pretrained(const std::string& dir, VaeRuntimeOptions runtime = {}) {
    return AutoencoderKLImpl::from_pretrained(dir, std::move(runtime));
  }
};

/// `Codec` over an AutoencoderKL: encode/decode without gradients on the VAE's device, latents
/// [latent_channels, H/8, W/8], scaling_factor from the VAE options (0.18215 for sd-vae).
class MDD_API VaeCodec : public Codec {
 public:
  /// Puts `vae` in eval mode on `device` (in `vae->runtime.dtype` on CUDA, float32 on CPU).
  explicit VaeCodec(AutoencoderKL vae, torch::Device device = torch::kCPU);
  /// Posterior (float32, on the VAE's device) for images in [-1, 1] (any device).
  DiagonalGaussian encode(const torch::Tensor& images) override;
  /// Float32 images from unscaled latents (any device).
  torch::Tensor decode(const torch::Tensor& latents) override;
  /// The VAE's scaling_factor option.
  double scaling_factor() const override;
  /// [latent_channels, H/f, W/f]; throws mdd::Error if H or W is not a multiple of f.
  std::vector<int64_t> latent_shape(const std::vector<int64_t>& image_shape) const override;
  /// The wrapped VAE.
  AutoencoderKL vae() const { return vae_; }

 private:
  AutoencoderKL vae_;
};

}  // namespace mdd
