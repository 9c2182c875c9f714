#pragma once
/// \file
/// Class-conditional Diffusion Transformer (DiT, Peebles & Xie 2023) with optional DiffFit gammas.
///
/// Parameter names equal the reference `model.state_dict()` keys of facebookresearch/DiT and
/// vimar-gu/MinimaxDiffusion `models.py`, so released checkpoints load with `strict = true`:
/// `pos_embed`, `x_embedder.proj.*`, `t_embedder.mlp.{0,2}.*`, `y_embedder.embedding_table.weight`,
/// `blocks.<i>.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2, adaLN_modulation.1}.*`,
/// `final_layer.{linear, adaLN_modulation.1}.*` and, after `apply_difffit`,
/// `blocks.<i>.{gamma1, gamma2, attn.gamma1, attn.gamma2}`.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <torch/arg.h>
#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "mdd/export.h"
#include "mdd/util/option_check.h"

namespace mdd {

/// Architecture of a DiT (the constructor arguments of the reference `DiT` class).
struct MDD_API DiTOptions {
  /// The six shape arguments; the rest default to the reference values.
  DiTOptions(int64_t input_size, int64_t patch_size, int64_t in_channels, int64_t hidden_size,
             int64_t depth, int64_t num_heads);
  /// Output channels: 2C with learn_sigma, else C. (Declared before the TORCH_ARGs, which end in
  /// a private section.)
  int64_t out_channels() const { return learn_sigma_ ? 2 * in_channels_ : in_channels_; }
  /// Spatial size of the (square) latent input; H = W = input_size.
  TORCH_ARG(int64_t, input_size);
  /// Patch side p (Conv2d kernel = stride = p); T = (input_size / p)^2 tokens.
  TORCH_ARG(int64_t, patch_size);
  /// Latent channels C.
  TORCH_ARG(int64_t, in_channels);
  /// Token width D.
  TORCH_ARG(int64_t, hidden_size);
  /// Number of transformer blocks.
  TORCH_ARG(int64_t, depth);
  /// Attention heads (D must be divisible by it).
  TORCH_ARG(int64_t, num_heads);
  /// MLP hidden width = int(D * mlp_ratio).
  TORCH_ARG(double, mlp_ratio) = 4.0;
  /// Label-dropout probability in train mode; > 0 also adds the null-class row to the label table.
  TORCH_ARG(double, class_dropout_prob) = 0.1;
  /// Number of real classes; the null (unconditional) class is `num_classes`.
  TORCH_ARG(int64_t, num_classes) = 1000;
  /// true: the output has 2C channels (eps, then the variance interpolation v); false: C (eps).
  TORCH_ARG(bool, learn_sigma) = true;
  /// On the CPU (float32 weights; no autocast or CPU bf16 autocast) each block and the final layer
  /// run through fused kernels: in inference (no autograd recording) as single-pass kernels, in
  /// training as autograd functions with hand-written backward kernels. The same maths with a
  /// different float summation order; inference 1.2-1.7x faster in float32 and about 2x with bf16
  /// autocast, training forward + backward 1.04-1.2x (docs/performance.md). false: always the
  /// module path (taps, CUDA and fp16 autocast take it in any case; so does double backward).
  TORCH_ARG(bool, fused) = true;

};

/// Options of one of the 12 reference configurations "DiT-{XL,L,B,S}/{2,4,8}" (in_channels 4,
/// mlp_ratio 4, class_dropout_prob 0.1, learn_sigma). `input_size` is the latent size (image / 8).
/// Throws `mdd::Error` listing the valid names for an unknown name.
MDD_API DiTOptions dit_options(const std::string& name, int64_t input_size = 32, int64_t num_classes = 1000);

/// The rules `DiT`'s constructor applies to its options (positive sizes, patch_size | input_size,
/// num_heads | hidden_size, class_dropout_prob in [0, 1)); each broken one goes to `fail`.
MDD_API void check_options(const DiTOptions& o, const OptionFail& fail);

/// The 12 names accepted by `dit_options`, in the reference's order (XL/2 ... S/8).
MDD_API std::vector<std::string> dit_model_names();

/// Fixed 2-D sin-cos position table [grid*grid, embed_dim] in float64, as the reference's
/// `get_2d_sincos_pos_embed` (token n = row*grid + col; first half encodes the column, second the
/// row; each half is [sin, cos]). `embed_dim` must be divisible by 4.
MDD_API torch::Tensor sincos_pos_embed_2d(int64_t embed_dim, int64_t grid_size);

// ------------------------------------------------------------------ submodules

/// timm `PatchEmbed` as DiT uses it: Conv2d(k = s = p) -> tokens [N, T, D] in row-major patch order.
class MDD_API PatchEmbedImpl : public torch::nn::Cloneable<PatchEmbedImpl> {
 public:
  /// Conv from `in_channels` to `hidden_size` with kernel = stride = `patch_size`.
  PatchEmbedImpl(int64_t in_channels, int64_t hidden_size, int64_t patch_size);
  /// (Re)creates `proj` with fresh parameters (torch's default init; `clone()` then copies values).
  void reset() override;
  /// [N, C, H, W] -> [N, (H/p)*(W/p), D].
  torch::Tensor forward(const torch::Tensor& x);
  /// Key `x_embedder.proj`.
  torch::nn::Conv2d proj{nullptr};

 private:
  int64_t in_channels_, hidden_size_, patch_size_;
};
/// Module holder for `PatchEmbedImpl`.
TORCH_MODULE(PatchEmbed);

/// Sinusoidal timestep features followed by Linear -> SiLU -> Linear (`t_embedder`).
class MDD_API TimestepEmbedderImpl : public torch::nn::Cloneable<TimestepEmbedderImpl> {
 public:
  /// MLP 256 -> `hidden_size` -> `hidden_size` (`frequency_embedding_size` = 256 in DiT).
  explicit TimestepEmbedderImpl(int64_t hidden_size, int64_t frequency_embedding_size = 256);
  /// (Re)creates `mlp` with fresh parameters.
  void reset() override;
  /// [N] timesteps (any numeric dtype, original 0..999 scale) -> [N, D].
  torch::Tensor forward(const torch::Tensor& t);
  /// [N] -> [N, dim] = [cos(t f_k), sin(t f_k)] (cos half first), f_k = exp(-ln(max_period) k / half),
  /// computed in float32 with the reference's operation order (so results match bitwise).
  static torch::Tensor timestep_embedding(const torch::Tensor& t, int64_t dim, double max_period = 10000.0);
  /// Keys `t_embedder.mlp.0` (Linear), `.1` (SiLU, no parameters), `.2` (Linear).
  torch::nn::Sequential mlp{nullptr};
  /// Width of the sinusoidal features (256).
  int64_t frequency_embedding_size;

 private:
  int64_t hidden_size_;
};
/// Module holder for `TimestepEmbedderImpl`.
TORCH_MODULE(TimestepEmbedder);

/// Class-label embedding table with an extra null-class row and train-mode label dropout (`y_embedder`).
class MDD_API LabelEmbedderImpl : public torch::nn::Cloneable<LabelEmbedderImpl> {
 public:
  /// Table of `num_classes + (dropout_prob > 0)` rows of width `hidden_size`.
  LabelEmbedderImpl(int64_t num_classes, int64_t hidden_size, double dropout_prob);
  /// (Re)creates `embedding_table` with fresh parameters.
  void reset() override;
  /// Looks up `labels` [N] (int64). With `train` and dropout_prob > 0 each label is first replaced by
  /// the null class with probability dropout_prob (uniform draw from `generator`, or torch's default
  /// generator when none is given, like the reference's `torch.rand`).
  torch::Tensor forward(const torch::Tensor& labels, bool train,
                        std::optional<torch::Generator> generator = std::nullopt);
  /// The reference's `token_drop`: labels where `drop` (bool [N]) is true become `num_classes`.
  torch::Tensor drop_labels(const torch::Tensor& labels, const torch::Tensor& drop) const;
  /// Key `y_embedder.embedding_table`.
  torch::nn::Embedding embedding_table{nullptr};
  /// Number of real classes (= index of the null row).
  int64_t num_classes;
  /// Label-dropout probability used in train mode.
  double dropout_prob;

 private:
  int64_t hidden_size_;
};
/// Module holder for `LabelEmbedderImpl`.
TORCH_MODULE(LabelEmbedder);

/// Multi-head self-attention (timm `Attention`, no qk-norm, no dropout) with optional DiffFit gammas.
class MDD_API DiTAttentionImpl : public torch::nn::Cloneable<DiTAttentionImpl> {
 public:
  /// qkv Linear(D, 3D) and proj Linear(D, D), both with bias.
  DiTAttentionImpl(int64_t dim, int64_t num_heads);
  /// (Re)creates qkv and proj with fresh parameters, and the gammas (ones) if `enable_gammas` ran:
  /// `clone()` keeps a DiffFit model's structure.
  void reset() override;
  /// [B, N, D] -> [B, N, D]. With LibTorch >= 2 the fused `scaled_dot_product_attention` is used,
  /// otherwise softmax((q * hd^-0.5) k^T) v (the same formula).
  torch::Tensor forward(const torch::Tensor& x);
  /// Registers `gamma1` [3D] (scales the qkv output, bias included) and `gamma2` [D] (scales the
  /// proj output), initialised to 1. Throws `mdd::Error` if they already exist.
  void enable_gammas();
  /// Keys `attn.qkv`, `attn.proj`.
  torch::nn::Linear qkv{nullptr}, proj{nullptr};
  /// DiffFit scale factors; undefined (and absent from the state_dict) until `enable_gammas`.
  torch::Tensor gamma1, gamma2;
  /// Head count and per-head width.
  int64_t num_heads, head_dim;

 private:
  void register_gammas();
  bool gammas_ = false;
};
/// Module holder for `DiTAttentionImpl`.
TORCH_MODULE(DiTAttention);

/// timm `Mlp`: fc1 -> GELU(tanh approximation) -> fc2.
class MDD_API DiTMlpImpl : public torch::nn::Cloneable<DiTMlpImpl> {
 public:
  /// fc1 Linear(dim, hidden), fc2 Linear(hidden, dim).
  DiTMlpImpl(int64_t dim, int64_t hidden);
  /// (Re)creates fc1 and fc2 with fresh parameters.
  void reset() override;
  /// [.., D] -> [.., D].
  torch::Tensor forward(const torch::Tensor& x);
  /// Keys `mlp.fc1`, `mlp.fc2`.
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};

 private:
  int64_t dim_, hidden_;
};
/// Module holder for `DiTMlpImpl`.
TORCH_MODULE(DiTMlp);

/// Intermediate tensors of one block (filled by `DiTImpl::forward_with_taps`).
struct MDD_API DiTBlockTaps {
  /// adaLN_modulation(c) [N, 6D] (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp).
  torch::Tensor adaLN;
  /// attn(modulate(norm1(x))) before gating [N, T, D].
  torch::Tensor attn;
  /// mlp(modulate(norm2(x))) before gating [N, T, D].
  torch::Tensor mlp;
  /// Block output [N, T, D].
  torch::Tensor out;
};

/// adaLN-Zero transformer block (LayerNorm eps 1e-6 without affine) with optional DiffFit gammas.
class MDD_API DiTBlockImpl : public torch::nn::Cloneable<DiTBlockImpl> {
 public:
  /// Block of width `hidden_size`, `num_heads` heads and MLP width int(hidden_size * mlp_ratio).
  DiTBlockImpl(int64_t hidden_size, int64_t num_heads, double mlp_ratio);
  /// (Re)creates the submodules with fresh parameters, and the gammas (ones) if `enable_gammas` ran.
  void reset() override;
  /// x [N, T, D], c [N, D] -> [N, T, D]; fills `taps` when not null.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& c, DiTBlockTaps* taps = nullptr);
  /// Registers `gamma1`, `gamma2` [D] here and `attn.gamma1/gamma2` (all ones).
  /// Throws `mdd::Error` if this block already has gammas.
  void enable_gammas();
  /// True once `enable_gammas` ran.
  bool has_gammas() const { return gammas_; }
  /// Whether CPU inference and training may take the fused kernels (see `DiTOptions::fused`; default true).
  void set_fused(bool fused) { fused_ = fused; }
  /// See `set_fused`.
  bool fused() const { return fused_; }
  /// Keys `attn.*`, `mlp.*`.
  DiTAttention attn{nullptr};
  /// Key `mlp.*`.
  DiTMlp mlp{nullptr};
  /// Keys `adaLN_modulation.0` (SiLU) and `adaLN_modulation.1` (Linear(D, 6D)).
  torch::nn::Sequential adaLN_modulation{nullptr};
  /// DiffFit residual-branch scale factors; undefined until `enable_gammas`.
  torch::Tensor gamma1, gamma2;

 private:
  // Creates gamma1/gamma2 (ones) and the attention's gammas; used by enable_gammas() and reset().
  void register_gammas();
  int64_t hidden_size_, num_heads_;
  double mlp_ratio_;
  bool gammas_ = false;
  bool fused_ = true;
};
/// Module holder for `DiTBlockImpl`.
TORCH_MODULE(DiTBlock);

/// adaLN-modulated LayerNorm followed by Linear(D, p*p*out_channels).
class MDD_API FinalLayerImpl : public torch::nn::Cloneable<FinalLayerImpl> {
 public:
  /// Projects width `hidden_size` tokens to p*p*out_channels values.
  FinalLayerImpl(int64_t hidden_size, int64_t patch_size, int64_t out_channels);
  /// (Re)creates the submodules with fresh parameters.
  void reset() override;
  /// x [N, T, D], c [N, D] -> [N, T, p*p*out_channels]. `allow_fused` false forces the module path
  /// (`DiT::forward_with_taps` passes it, so that every tap comes from the module path).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& c, bool allow_fused = true);
  /// Whether CPU inference and training may take the fused kernels (see `DiTOptions::fused`; default true).
  void set_fused(bool fused) { fused_ = fused; }
  /// See `set_fused`.
  bool fused() const { return fused_; }
  /// Key `final_layer.linear`.
  torch::nn::Linear linear{nullptr};
  /// Keys `final_layer.adaLN_modulation.0` (SiLU) and `.1` (Linear(D, 2D); shift first).
  torch::nn::Sequential adaLN_modulation{nullptr};

 private:
  int64_t hidden_size_, patch_size_, out_channels_;
  bool fused_ = true;
};
/// Module holder for `FinalLayerImpl`.
TORCH_MODULE(FinalLayer);

/// Every intermediate of one DiT forward pass (for golden tests and debugging).
struct MDD_API DiTTaps {
  /// Sinusoidal timestep features [N, 256].
  torch::Tensor t_freq;
  /// t_embedder(t) [N, D].
  torch::Tensor t_emb;
  /// y_embedder(y) [N, D] (after label dropout in train mode).
  torch::Tensor y_emb;
  /// c = t_emb + y_emb [N, D].
  torch::Tensor c;
  /// x_embedder(x) + pos_embed [N, T, D].
  torch::Tensor x_tokens_pos;
  /// One entry per block.
  std::vector<DiTBlockTaps> blocks;
  /// final_layer output before unpatchify [N, T, p*p*out_channels].
  torch::Tensor final_layer_out;
  /// The forward output [N, out_channels, H, W].
  torch::Tensor out;
};

// ------------------------------------------------------------------ the model

/// Class-conditional DiT. Input latents [N, C, H, W] with H = W = input_size, timesteps [N]
/// (original 0..999 scale), labels [N] int64 in [0, num_classes] (num_classes = null class).
/// Output [N, out_channels, H, W]: channels [0, C) = epsilon, [C, 2C) = variance value v.
/// Shape or label errors throw `mdd::Error`.
class MDD_API DiTImpl : public torch::nn::Cloneable<DiTImpl> {
 public:
  /// Guide only eps channels 0..2 (the reference `forward_with_cfg`; used for the paper's samples).
  static constexpr int64_t kReferenceGuidedChannels = 3;
  /// Guide all C eps channels (the "standard" classifier-free guidance the reference leaves commented out).
  static constexpr int64_t kAllEpsChannels = -1;

  /// Builds the model and initialises it as the reference (`initialize_weights` with torch's
  /// default generator; call `initialize_weights(gen)` again for a seeded initialisation).
  explicit DiTImpl(DiTOptions options);

  /// Rebuilds every submodule (keeping DiffFit gammas where `apply_difffit` added them) with
  /// LibTorch's default initialisation; the constructor then runs `initialize_weights()` (call it
  /// yourself after a manual reset()). `clone()` (from `torch::nn::Cloneable`) calls reset() on the
  /// copy and then copies every parameter and buffer: `model->clone()` is an independent deep copy
  /// with the same structure, values, devices and dtypes (the EMA copy of `Finetuner` and
  /// `Pretrainer` is made so).
  void reset() override;

  /// Noise prediction [N, out_channels, H, W]. In train mode labels are dropped to the null
  /// class with probability class_dropout_prob (see `set_label_dropout_generator`).
  torch::Tensor forward(torch::Tensor x, torch::Tensor t, torch::Tensor y);

  /// `forward` that also records every intermediate in `taps` (overwritten).
  torch::Tensor forward_with_taps(torch::Tensor x, torch::Tensor t, torch::Tensor y, DiTTaps& taps);

  /// Reference classifier-free guidance: x, t, y hold 2B rows (first half conditional labels,
  /// second half usually the null class). Only x[:B] is used (duplicated for both halves).
  /// Output channels 0..2 (`model_out[:, :3]`, fewer when the output has fewer) become
  /// uncond + s * (cond - uncond) in both halves; eps channel 3 and the variance channels are each
  /// half's own output. Odd batch -> `mdd::Error`. The combine is `cfg_combine` (diffusion/guidance.h).
  torch::Tensor forward_with_cfg(torch::Tensor x, torch::Tensor t, torch::Tensor y, double cfg_scale);

  /// As above but guiding output channels [0, guided_channels): `kReferenceGuidedChannels` (3) is
  /// the reference rule (min(3, out_channels)), `kAllEpsChannels` (-1) guides all in_channels eps channels. Other values must
  /// lie in [1, out_channels].
  torch::Tensor forward_with_cfg(torch::Tensor x, torch::Tensor t, torch::Tensor y, double cfg_scale,
                                 int64_t guided_channels);

  /// Label of the unconditional (null) class == num_classes.
  int64_t null_class() const;

  /// The options the model was built with.
  const DiTOptions& options() const { return options_; }

  /// Generator for train-mode label dropout. `std::nullopt` (the default) uses torch's default
  /// generator for the labels' device, like the reference's `torch.rand`. The generator must live
  /// on the device of the labels.
  void set_label_dropout_generator(std::optional<torch::Generator> generator);

  /// Reference initialisation (`initialize_weights`): xavier-uniform Linear weights and zero biases,
  /// xavier-uniform patch conv (viewed as [D, -1]), N(0, 0.02) label table and t-MLP weights, zero
  /// adaLN and final linear, pos_embed = the sin-cos table, gammas = 1. Draws from `generator`
  /// (a CPU generator when the model is on the CPU) or torch's default generator.
  void initialize_weights(std::optional<torch::Generator> generator = std::nullopt);

  /// [N, T, p*p*c] -> [N, c, H, W] (token layout (p_row, p_col, channel), channel fastest).
  torch::Tensor unpatchify(const torch::Tensor& x) const;

  /// Block `i` (0-based; throws `mdd::Error` when out of range).
  DiTBlock block(int64_t i) const;

  /// Fixed sin-cos position table [1, T, D] (a Parameter with requires_grad = false, key `pos_embed`).
  torch::Tensor pos_embed;
  /// Key `x_embedder`.
  PatchEmbed x_embedder{nullptr};
  /// Key `t_embedder`.
  TimestepEmbedder t_embedder{nullptr};
  /// Key `y_embedder`.
  LabelEmbedder y_embedder{nullptr};
  /// Keys `blocks.<i>`.
  torch::nn::ModuleList blocks{nullptr};
  /// Key `final_layer`.
  FinalLayer final_layer{nullptr};

 private:
  torch::Tensor forward_impl(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& y,
                             DiTTaps* taps);
  void check_inputs(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& y,
                    const char* where) const;

  DiTOptions options_;
  std::optional<torch::Generator> dropout_generator_;
};
/// Module holder for `DiTImpl`.
TORCH_MODULE(DiT);

}  // namespace mdd
