#include "mdd/models/dit.h"

#include "mdd/diffusion/guidance.h"

#include <cmath>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/activation.h>
#include <torch/torch.h>
#include <torch/version.h>

#include "mdd/util/error.h"
#include "models/fused_dit.h"
#include "util/torch_compat.h"

namespace mdd {
namespace {

std::vector<int64_t> shape_of(const torch::Tensor& t) { return t.defined() ? t.sizes().vec() : std::vector<int64_t>{}; }

// DiT's modulate(): per-sample shift/scale broadcast over tokens.
torch::Tensor modulate(const torch::Tensor& x, const torch::Tensor& shift, const torch::Tensor& scale) {
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1);
}

// LayerNorm(D, eps=1e-6, elementwise_affine=False): no parameters, so no module (and no keys).
torch::Tensor layer_norm_no_affine(const torch::Tensor& x) {
  return torch::layer_norm(x, {x.size(-1)}, c10::nullopt, c10::nullopt, 1e-6);
}

// The Linear inside a Sequential(SiLU, Linear) (index 1, key `adaLN_modulation.1`).
torch::nn::Linear sequential_linear(const torch::nn::Sequential& seq, size_t index) {
  return torch::nn::Linear(seq->ptr<torch::nn::LinearImpl>(index));
}

// The public API speaks std::optional; LibTorch 1.13's ops take c10::optional (a distinct type there).
c10::optional<at::Generator> to_c10(const std::optional<torch::Generator>& gen) {
  if (gen) return *gen;
  return c10::nullopt;
}

// nn.init.xavier_uniform_ on a 2-D view, drawing from an optional generator (gain 1).
void xavier_uniform(torch::Tensor w2d, const std::optional<torch::Generator>& gen) {
  const double fan_out = static_cast<double>(w2d.size(0)), fan_in = static_cast<double>(w2d.size(1));
  const double a = std::sqrt(6.0 / (fan_in + fan_out));
  w2d.uniform_(-a, a, to_c10(gen));
}

// timm's non-fused attention, in its op order: (q * head_dim^-0.5) @ k^T, softmax, @ v. With
// `fp32_softmax` the softmax runs in float32 and its result is cast back to v's dtype (bf16 path).
torch::Tensor explicit_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                 bool fp32_softmax) {
  auto scores = torch::matmul(q * std::pow(static_cast<double>(q.size(-1)), -0.5), k.transpose(-2, -1));
  auto attn = fp32_softmax ? scores.softmax(-1, torch::kFloat32).to(v.scalar_type()) : scores.softmax(-1);
  return torch::matmul(attn, v);
}

}  // namespace

// ------------------------------------------------------------------ options

DiTOptions::DiTOptions(int64_t input_size, int64_t patch_size, int64_t in_channels, int64_t hidden_size,
                       int64_t depth, int64_t num_heads)
    : input_size_(input_size),
      patch_size_(patch_size),
      in_channels_(in_channels),
      hidden_size_(hidden_size),
      depth_(depth),
      num_heads_(num_heads) {}

namespace {
struct Preset {
  const char* name;
  int64_t depth, hidden, heads, patch;
};
// DiT models.py:328-370, in the order of its DiT_models dict.
constexpr Preset kPresets[] = {
    {"DiT-XL/2", 28, 1152, 16, 2}, {"DiT-XL/4", 28, 1152, 16, 4}, {"DiT-XL/8", 28, 1152, 16, 8},
    {"DiT-L/2", 24, 1024, 16, 2},  {"DiT-L/4", 24, 1024, 16, 4},  {"DiT-L/8", 24, 1024, 16, 8},
    {"DiT-B/2", 12, 768, 12, 2},   {"DiT-B/4", 12, 768, 12, 4},   {"DiT-B/8", 12, 768, 12, 8},
    {"DiT-S/2", 12, 384, 6, 2},    {"DiT-S/4", 12, 384, 6, 4},    {"DiT-S/8", 12, 384, 6, 8},
};
}  // namespace

std::vector<std::string> dit_model_names() {
  std::vector<std::string> names;
  for (const auto& p : kPresets) names.emplace_back(p.name);
  return names;
}

DiTOptions dit_options(const std::string& name, int64_t input_size, int64_t num_classes) {
  for (const auto& p : kPresets) {
    if (name == p.name) {
      return DiTOptions(input_size, p.patch, /*in_channels=*/4, p.hidden, p.depth, p.heads).num_classes(num_classes);
    }
  }
  throw Error(fmt::format("dit_options: unknown DiT model '{}'; valid names: {}", name,
                          fmt::join(dit_model_names(), ", ")));
}

torch::Tensor sincos_pos_embed_2d(int64_t embed_dim, int64_t grid_size) {
  MDD_CHECK(embed_dim > 0 && embed_dim % 4 == 0,
          fmt::format("sincos_pos_embed_2d: embed_dim {} must be a positive multiple of 4", embed_dim));
  MDD_CHECK(grid_size > 0, fmt::format("sincos_pos_embed_2d: grid_size {} must be positive", grid_size));
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  // get_1d_sincos_pos_embed_from_grid(E, pos): omega_k = 1 / 10000^(k / (E/2)), [sin(pos w), cos(pos w)].
  const int64_t half_dim = embed_dim / 2;  // E of each 1-D embedding
  auto omega = torch::arange(half_dim / 2, f64) / (static_cast<double>(half_dim) / 2.0);
  omega = 1.0 / torch::pow(10000.0, omega);
  auto embed_1d = [&](const torch::Tensor& pos) {
    auto out = pos.unsqueeze(1) * omega.unsqueeze(0);
    return torch::cat({torch::sin(out), torch::cos(out)}, 1);
  };
  // np.meshgrid(grid_w, grid_h) puts the column index in grid[0], which feeds the FIRST half.
  auto token = torch::arange(grid_size * grid_size, f64);
  auto col = torch::remainder(token, static_cast<double>(grid_size));
  auto row = torch::floor(token / static_cast<double>(grid_size));
  return torch::cat({embed_1d(col), embed_1d(row)}, 1);
}

// ------------------------------------------------------------------ submodules

// Every submodule follows LibTorch's Cloneable pattern: the constructor keeps its arguments and calls
// reset(), which creates the parameters; clone() runs reset() on a copy and copies the values over.

PatchEmbedImpl::PatchEmbedImpl(int64_t in_channels, int64_t hidden_size, int64_t patch_size)
    : in_channels_(in_channels), hidden_size_(hidden_size), patch_size_(patch_size) {
  reset();
}

void PatchEmbedImpl::reset() {
  proj = register_module("proj", torch::nn::Conv2d(torch::nn::Conv2dOptions(in_channels_, hidden_size_, patch_size_)
                                                       .stride(patch_size_)
                                                       .bias(true)));
}

torch::Tensor PatchEmbedImpl::forward(const torch::Tensor& x) { return proj->forward(x).flatten(2).transpose(1, 2); }

TimestepEmbedderImpl::TimestepEmbedderImpl(int64_t hidden_size, int64_t frequency_embedding_size_)
    : frequency_embedding_size(frequency_embedding_size_), hidden_size_(hidden_size) {
  reset();
}

void TimestepEmbedderImpl::reset() {
  mlp = register_module("mlp", torch::nn::Sequential(torch::nn::Linear(frequency_embedding_size, hidden_size_),
                                                     torch::nn::SiLU(),
                                                     torch::nn::Linear(hidden_size_, hidden_size_)));
}

torch::Tensor TimestepEmbedderImpl::timestep_embedding(const torch::Tensor& t, int64_t dim, double max_period) {
  MDD_CHECK(t.defined() && t.dim() == 1, fmt::format("timestep_embedding: t must be 1-D [N], got {}", shape_of(t)));
  const int64_t half = dim / 2;
  // Same float32 op order as DiT models.py: exp((-ln(max_period) * arange) / half), then t * freqs.
  // The arguments reach ~1000 rad, so a 1-ulp different frequency would move the result by ~1e-4.
  auto freqs = torch::exp(torch::arange(0, half, torch::TensorOptions().dtype(torch::kFloat32))
                              .mul(-std::log(max_period))
                              .div(half))
                   .to(t.device());
  auto args = t.unsqueeze(1).to(torch::kFloat32) * freqs.unsqueeze(0);
  auto embedding = torch::cat({torch::cos(args), torch::sin(args)}, -1);
  if (dim % 2) embedding = torch::cat({embedding, torch::zeros_like(embedding.narrow(1, 0, 1))}, -1);
  return embedding;
}

torch::Tensor TimestepEmbedderImpl::forward(const torch::Tensor& t) {
  return mlp->forward(timestep_embedding(t, frequency_embedding_size));
}

LabelEmbedderImpl::LabelEmbedderImpl(int64_t num_classes_, int64_t hidden_size, double dropout_prob_)
    : num_classes(num_classes_), dropout_prob(dropout_prob_), hidden_size_(hidden_size) {
  reset();
}

void LabelEmbedderImpl::reset() {
  const int64_t rows = num_classes + (dropout_prob > 0 ? 1 : 0);
  embedding_table = register_module("embedding_table", torch::nn::Embedding(rows, hidden_size_));
}

torch::Tensor LabelEmbedderImpl::drop_labels(const torch::Tensor& labels, const torch::Tensor& drop) const {
  return torch::where(drop, torch::full_like(labels, num_classes), labels);
}

torch::Tensor LabelEmbedderImpl::forward(const torch::Tensor& labels, bool train,
                                         std::optional<torch::Generator> generator) {
  torch::Tensor y = labels;
  if (train && dropout_prob > 0) {
    // torch.rand(N) < p, drawn on the generator's device (the default generator of the labels'
    // device when none is given), then moved to the labels.
    const auto device = generator ? generator->device() : labels.device();
    auto u = torch::rand({labels.size(0)}, to_c10(generator), torch::TensorOptions().device(device));
    y = drop_labels(labels, (u < dropout_prob).to(labels.device()));
  }
  return embedding_table->forward(y);
}

DiTAttentionImpl::DiTAttentionImpl(int64_t dim, int64_t num_heads_) : num_heads(num_heads_), head_dim(dim / num_heads_) {
  reset();
}

void DiTAttentionImpl::reset() {
  const int64_t dim = num_heads * head_dim;
  qkv = register_module("qkv", torch::nn::Linear(torch::nn::LinearOptions(dim, 3 * dim).bias(true)));
  proj = register_module("proj", torch::nn::Linear(dim, dim));
  if (gammas_) register_gammas();
}

void DiTAttentionImpl::register_gammas() {
  // On the device/dtype of the weights, so a model moved or cast before apply_difffit stays uniform.
  const auto opts = qkv->weight.options();
  const int64_t dim = proj->weight.size(0);
  gamma1 = register_parameter("gamma1", torch::ones({3 * dim}, opts));
  gamma2 = register_parameter("gamma2", torch::ones({dim}, opts));
}

void DiTAttentionImpl::enable_gammas() {
  MDD_CHECK(!gammas_, "DiTAttention::enable_gammas: gammas already exist");
  gammas_ = true;
  register_gammas();
}

torch::Tensor DiTAttentionImpl::forward(const torch::Tensor& x) {
  const int64_t B = x.size(0), N = x.size(1), C = x.size(2);
  auto h = qkv->forward(x);
  if (gamma1.defined()) h = gamma1 * h;  // MinimaxDiffusion: scales qkv output incl. bias, before the head split
  auto parts = h.reshape({B, N, 3, num_heads, head_dim}).permute({2, 0, 3, 1, 4}).unbind(0);
  torch::Tensor out;
  // LibTorch's CPU flash-attention backward is slow in bf16 at DiT sequence lengths: forward +
  // backward of [64, 4, 49, 24] took 63 ms against 14 ms for the explicit path below, 171 vs 23 ms
  // at batch 200, 43 vs 39 ms for DiT-S/2's [8, 6, 256, 64] (PyTorch 2.11, 1 thread,
  // docs/performance.md). Its forward is fast (2.5 vs 5.6 ms, 5.6 vs 24 ms), so only a bf16 CPU
  // forward that autograd records takes the explicit path, with an fp32 softmax.
  const bool cpu_bf16_grad = h.device().is_cpu() && h.scalar_type() == torch::kBFloat16 &&
                             torch::GradMode::is_enabled() && h.requires_grad();
  if (cpu_bf16_grad) {
    out = explicit_attention(parts[0], parts[1], parts[2], /*fp32_softmax=*/true);
  } else if constexpr (compat::kHasSdpa) {
    // Fused kernel (flash / memory-efficient on CUDA); default scale is head_dim^-0.5 as below.
    out = compat::sdpa(parts[0], parts[1], parts[2]);
  } else {
    out = explicit_attention(parts[0], parts[1], parts[2], /*fp32_softmax=*/false);
  }
  out = proj->forward(out.transpose(1, 2).reshape({B, N, C}));
  if (gamma2.defined()) out = gamma2 * out;
  return out;
}

DiTMlpImpl::DiTMlpImpl(int64_t dim, int64_t hidden) : dim_(dim), hidden_(hidden) { reset(); }

void DiTMlpImpl::reset() {
  fc1 = register_module("fc1", torch::nn::Linear(dim_, hidden_));
  fc2 = register_module("fc2", torch::nn::Linear(hidden_, dim_));
}

torch::Tensor DiTMlpImpl::forward(const torch::Tensor& x) {
  return fc2->forward(torch::gelu(fc1->forward(x), "tanh"));
}

DiTBlockImpl::DiTBlockImpl(int64_t hidden_size, int64_t num_heads, double mlp_ratio)
    : hidden_size_(hidden_size), num_heads_(num_heads), mlp_ratio_(mlp_ratio) {
  reset();
}

void DiTBlockImpl::reset() {
  attn = register_module("attn", DiTAttention(hidden_size_, num_heads_));
  // int(hidden_size * mlp_ratio) as the reference (Python int() truncates).
  mlp = register_module("mlp", DiTMlp(hidden_size_, static_cast<int64_t>(static_cast<double>(hidden_size_) * mlp_ratio_)));
  adaLN_modulation = register_module(
      "adaLN_modulation", torch::nn::Sequential(torch::nn::SiLU(), torch::nn::Linear(hidden_size_, 6 * hidden_size_)));
  if (gammas_) register_gammas();
}

void DiTBlockImpl::register_gammas() {
  const auto opts = attn->proj->weight.options();
  gamma1 = register_parameter("gamma1", torch::ones({hidden_size_}, opts));
  gamma2 = register_parameter("gamma2", torch::ones({hidden_size_}, opts));
  attn->enable_gammas();
}

void DiTBlockImpl::enable_gammas() {
  MDD_CHECK(!gammas_, "DiTBlock::enable_gammas: gammas already exist");
  gammas_ = true;
  register_gammas();
}

torch::Tensor DiTBlockImpl::forward(const torch::Tensor& x_in, const torch::Tensor& c, DiTBlockTaps* taps) {
  if (fused_ && !taps) {
    const auto mode = detail::fused_dit_mode(x_in, attn->qkv->weight);
    if (mode != detail::FusedDiTMode::kNone) return detail::fused_block_forward(*this, x_in, c, mode);
    const auto train_mode = detail::fused_dit_train_mode(x_in, attn->qkv->weight);
    if (train_mode != detail::FusedDiTMode::kNone) return detail::fused_block_forward_train(*this, x_in, c, train_mode);
  }
  auto mod_all = adaLN_modulation->forward(c);
  // shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
  auto mod = mod_all.chunk(6, 1);
  auto a = attn->forward(modulate(layer_norm_no_affine(x_in), mod[0], mod[1]));
  auto gate_msa = mod[2].unsqueeze(1);
  // MinimaxDiffusion: x + gamma1 * gate * attn(...) (the python int 1 when the block has no gamma).
  auto x = gamma1.defined() ? x_in + gamma1 * gate_msa * a : x_in + gate_msa * a;
  auto m = mlp->forward(modulate(layer_norm_no_affine(x), mod[3], mod[4]));
  auto gate_mlp = mod[5].unsqueeze(1);
  x = gamma2.defined() ? x + gamma2 * gate_mlp * m : x + gate_mlp * m;
  if (taps) {
    taps->adaLN = mod_all;
    taps->attn = a;
    taps->mlp = m;
    taps->out = x;
  }
  return x;
}

FinalLayerImpl::FinalLayerImpl(int64_t hidden_size, int64_t patch_size, int64_t out_channels)
    : hidden_size_(hidden_size), patch_size_(patch_size), out_channels_(out_channels) {
  reset();
}

void FinalLayerImpl::reset() {
  linear = register_module("linear", torch::nn::Linear(hidden_size_, patch_size_ * patch_size_ * out_channels_));
  adaLN_modulation = register_module(
      "adaLN_modulation", torch::nn::Sequential(torch::nn::SiLU(), torch::nn::Linear(hidden_size_, 2 * hidden_size_)));
}

torch::Tensor FinalLayerImpl::forward(const torch::Tensor& x, const torch::Tensor& c, bool allow_fused) {
  if (fused_ && allow_fused) {
    const auto mode = detail::fused_dit_mode(x, linear->weight);
    if (mode != detail::FusedDiTMode::kNone) return detail::fused_final_forward(*this, x, c, mode);
    const auto train_mode = detail::fused_dit_train_mode(x, linear->weight);
    if (train_mode != detail::FusedDiTMode::kNone) return detail::fused_final_forward_train(*this, x, c, train_mode);
  }
  auto mod = adaLN_modulation->forward(c).chunk(2, 1);  // shift first, then scale
  return linear->forward(modulate(layer_norm_no_affine(x), mod[0], mod[1]));
}

// ------------------------------------------------------------------ DiT

void check_options(const DiTOptions& o, const OptionFail& fail) {
  for (auto [name, v] : {std::pair<const char*, int64_t>{"input_size", o.input_size()}, {"patch_size", o.patch_size()},
                         {"in_channels", o.in_channels()}, {"hidden_size", o.hidden_size()},
                         {"num_heads", o.num_heads()}, {"num_classes", o.num_classes()}})
    if (v <= 0) fail(name, fmt::format("must be > 0, got {}", v));
  if (o.depth() < 0) fail("depth", fmt::format("must be >= 0, got {}", o.depth()));
  if (o.patch_size() > 0 && o.input_size() % o.patch_size() != 0)
    fail("patch_size", fmt::format("{} must divide input_size {}", o.patch_size(), o.input_size()));
  if (o.num_heads() > 0 && o.hidden_size() % o.num_heads() != 0)
    fail("num_heads", fmt::format("{} must divide hidden_size {}", o.num_heads(), o.hidden_size()));
  if (o.hidden_size() % 4 != 0)
    fail("hidden_size", fmt::format("must be a multiple of 4 (2-D sin-cos position table), got {}", o.hidden_size()));
  if (!(o.mlp_ratio() > 0) || static_cast<int64_t>(static_cast<double>(o.hidden_size()) * o.mlp_ratio()) <= 0)
    fail("mlp_ratio", fmt::format("{} gives an empty MLP", o.mlp_ratio()));
  // [0, 1): at 1 every training label would be the null class and the model could not learn classes.
  if (!(o.class_dropout_prob() >= 0 && o.class_dropout_prob() < 1))
    fail("class_dropout_prob", fmt::format("must lie in [0, 1), got {}", o.class_dropout_prob()));
}

DiTImpl::DiTImpl(DiTOptions options) : options_(std::move(options)) {
  check_options(options_, throw_option_error("DiT"));
  reset();
  initialize_weights();
}

void DiTImpl::reset() {
  const auto& o = options_;
  // A DiffFit model keeps its gammas: the blocks that had them get them again (as ones).
  std::vector<bool> gammas;
  if (blocks)
    for (const auto& m : *blocks) gammas.push_back(m->as<DiTBlockImpl>()->has_gammas());
  // Registration order follows the reference __init__ (x_embedder, t_embedder, y_embedder,
  // pos_embed, blocks, final_layer) so parameter order matches named_parameters() there.
  x_embedder = register_module("x_embedder", PatchEmbed(o.in_channels(), o.hidden_size(), o.patch_size()));
  t_embedder = register_module("t_embedder", TimestepEmbedder(o.hidden_size()));
  y_embedder = register_module("y_embedder", LabelEmbedder(o.num_classes(), o.hidden_size(), o.class_dropout_prob()));
  const int64_t grid = o.input_size() / o.patch_size();
  pos_embed = register_parameter("pos_embed", torch::zeros({1, grid * grid, o.hidden_size()}), /*requires_grad=*/false);
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < o.depth(); ++i) {
    DiTBlock b(o.hidden_size(), o.num_heads(), o.mlp_ratio());
    if (size_t(i) < gammas.size() && gammas[size_t(i)]) b->enable_gammas();
    b->set_fused(o.fused());
    blocks->push_back(b);
  }
  final_layer = register_module("final_layer", FinalLayer(o.hidden_size(), o.patch_size(), o.out_channels()));
  final_layer->set_fused(o.fused());
  // No initialize_weights() here: clone() calls reset() on the copy and then overwrites every value,
  // so initialising here would be wasted work and extra global-RNG draws per EMA copy. The
  // constructor initialises.
}

void DiTImpl::initialize_weights(std::optional<torch::Generator> gen) {
  torch::NoGradGuard no_grad;
  // _basic_init: every Linear gets xavier_uniform weights and zero bias.
  for (auto& m : modules(/*include_self=*/false)) {
    if (auto* lin = m->as<torch::nn::LinearImpl>()) {
      xavier_uniform(lin->weight, gen);
      if (lin->bias.defined()) lin->bias.zero_();
    }
  }
  const int64_t grid = options_.input_size() / options_.patch_size();
  pos_embed.copy_(sincos_pos_embed_2d(options_.hidden_size(), grid).to(torch::kFloat32).unsqueeze(0));
  auto w = x_embedder->proj->weight;
  xavier_uniform(w.view({w.size(0), -1}), gen);
  x_embedder->proj->bias.zero_();
  y_embedder->embedding_table->weight.normal_(0.0, 0.02, to_c10(gen));
  sequential_linear(t_embedder->mlp, 0)->weight.normal_(0.0, 0.02, to_c10(gen));
  sequential_linear(t_embedder->mlp, 2)->weight.normal_(0.0, 0.02, to_c10(gen));
  for (const auto& m : *blocks) {
    auto* b = m->as<DiTBlockImpl>();
    auto ada = sequential_linear(b->adaLN_modulation, 1);
    ada->weight.zero_();
    ada->bias.zero_();
    for (auto* g : {&b->gamma1, &b->gamma2, &b->attn->gamma1, &b->attn->gamma2})
      if (g->defined()) g->fill_(1.0);
  }
  auto fada = sequential_linear(final_layer->adaLN_modulation, 1);
  fada->weight.zero_();
  fada->bias.zero_();
  final_layer->linear->weight.zero_();
  final_layer->linear->bias.zero_();
}

int64_t DiTImpl::null_class() const { return options_.num_classes(); }

void DiTImpl::set_label_dropout_generator(std::optional<torch::Generator> generator) {
  dropout_generator_ = std::move(generator);
}

DiTBlock DiTImpl::block(int64_t i) const {
  MDD_CHECK(i >= 0 && i < static_cast<int64_t>(blocks->size()),
          fmt::format("DiT::block: index {} out of range (depth {})", i, blocks->size()));
  return DiTBlock(blocks->ptr<DiTBlockImpl>(static_cast<size_t>(i)));
}

void DiTImpl::check_inputs(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& y,
                           const char* where) const {
  const auto& o = options_;
  MDD_CHECK(x.defined() && x.dim() == 4, fmt::format("DiT::{}: x must be [N, C, H, W], got shape {}", where, shape_of(x)));
  MDD_CHECK(x.is_floating_point(), fmt::format("DiT::{}: x must be floating point, got {}", where, c10::toString(x.scalar_type())));
  MDD_CHECK(x.size(1) == o.in_channels(), fmt::format("DiT::{}: x has {} channels, the model expects {} (shape {})",
                                                    where, x.size(1), o.in_channels(), shape_of(x)));
  MDD_CHECK(x.size(2) % o.patch_size() == 0 && x.size(3) % o.patch_size() == 0,
          fmt::format("DiT::{}: x spatial size {}x{} is not divisible by patch_size {}", where, x.size(2), x.size(3),
                      o.patch_size()));
  MDD_CHECK(x.size(2) == o.input_size() && x.size(3) == o.input_size(),
          fmt::format("DiT::{}: x spatial size {}x{} differs from the model's input_size {} (fixed position table)",
                      where, x.size(2), x.size(3), o.input_size()));
  const int64_t n = x.size(0);
  MDD_CHECK(t.defined() && t.dim() == 1 && t.size(0) == n,
          fmt::format("DiT::{}: t must be [N] = [{}], got shape {}", where, n, shape_of(t)));
  MDD_CHECK(t.scalar_type() != torch::kBool, fmt::format("DiT::{}: t must be numeric, got Bool", where));
  MDD_CHECK(y.defined() && y.dim() == 1 && y.size(0) == n,
          fmt::format("DiT::{}: y must be [N] = [{}], got shape {}", where, n, shape_of(y)));
  MDD_CHECK(y.scalar_type() == torch::kLong || y.scalar_type() == torch::kInt,
          fmt::format("DiT::{}: y must be int64 labels, got {}", where, c10::toString(y.scalar_type())));
  if (n > 0) {
    // Out-of-range labels would be a device-side assert on CUDA: check (one sync) and report.
    const int64_t max_label = y_embedder->embedding_table->weight.size(0) - 1;
    const bool bad = ((y < 0) | (y > max_label)).any().item<bool>();
    MDD_CHECK(!bad, fmt::format("DiT::{}: labels must lie in [0, {}] ({} classes{}), got min {} max {}", where, max_label,
                              o.num_classes(), max_label == o.num_classes() ? " + null class" : ", no null class",
                              y.min().item<int64_t>(), y.max().item<int64_t>()));
  }
}

torch::Tensor DiTImpl::unpatchify(const torch::Tensor& x) const {
  const int64_t c = options_.out_channels(), p = options_.patch_size();
  const int64_t n = x.size(0);
  const int64_t h = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(x.size(1)))));
  MDD_CHECK(x.dim() == 3 && h * h == x.size(1) && x.size(2) == p * p * c,
          fmt::format("DiT::unpatchify: expected [N, h*h, {}], got {}", p * p * c, shape_of(x)));
  // reshape(N, h, w, p, p, c) -> einsum('nhwpqc->nchpwq') -> (N, c, h*p, w*p)
  return x.reshape({n, h, h, p, p, c}).permute({0, 5, 1, 3, 2, 4}).reshape({n, c, h * p, h * p});
}

torch::Tensor DiTImpl::forward_impl(const torch::Tensor& x_in, const torch::Tensor& t_in, const torch::Tensor& y_in,
                                    DiTTaps* taps) {
  check_inputs(x_in, t_in, y_in, taps ? "forward_with_taps" : "forward");
  const auto y_long = y_in.to(torch::kLong);
  torch::Tensor x = x_embedder->forward(x_in);  // [B, N, D], a transposed view of the conv output
  if (torch::GradMode::is_enabled()) {
    x = x + pos_embed;
  } else {
    // Written straight into a contiguous tensor: `x + pos_embed` would keep the transposed layout
    // and the first block would copy it again.
    torch::Tensor out = torch::empty(x.sizes(), x.options().dtype(at::result_type(x, pos_embed)));
    x = at::add_out(out, x, pos_embed);
  }
  torch::Tensor t_freq;
  torch::Tensor t_emb;
  if (taps) {
    t_freq = TimestepEmbedderImpl::timestep_embedding(t_in, t_embedder->frequency_embedding_size);
    t_emb = t_embedder->mlp->forward(t_freq);
  } else {
    t_emb = t_embedder->forward(t_in);
  }
  auto y_emb = y_embedder->forward(y_long, is_training(), dropout_generator_);
  auto c = t_emb + y_emb;
  if (taps) {
    *taps = DiTTaps{};
    taps->t_freq = t_freq;
    taps->t_emb = t_emb;
    taps->y_emb = y_emb;
    taps->c = c;
    taps->x_tokens_pos = x;
    taps->blocks.resize(blocks->size());
  }
  // The ModuleList is the one owner of the blocks (a second list of holders would go stale when
  // clone() replaces the list's modules).
  for (size_t i = 0; i < blocks->size(); ++i)
    x = blocks->ptr<DiTBlockImpl>(i)->forward(x, c, taps ? &taps->blocks[i] : nullptr);
  x = final_layer->forward(x, c, /*allow_fused=*/taps == nullptr);
  auto out = unpatchify(x);
  if (taps) {
    taps->final_layer_out = x;
    taps->out = out;
  }
  return out;
}

torch::Tensor DiTImpl::forward(torch::Tensor x, torch::Tensor t, torch::Tensor y) {
  return forward_impl(x, t, y, nullptr);
}

torch::Tensor DiTImpl::forward_with_taps(torch::Tensor x, torch::Tensor t, torch::Tensor y, DiTTaps& taps) {
  return forward_impl(x, t, y, &taps);
}

torch::Tensor DiTImpl::forward_with_cfg(torch::Tensor x, torch::Tensor t, torch::Tensor y, double cfg_scale) {
  return forward_with_cfg(std::move(x), std::move(t), std::move(y), cfg_scale, kReferenceGuidedChannels);
}

torch::Tensor DiTImpl::forward_with_cfg(torch::Tensor x, torch::Tensor t, torch::Tensor y, double cfg_scale,
                                        int64_t guided_channels) {
  MDD_CHECK(x.defined() && x.dim() == 4,
          fmt::format("DiT::forward_with_cfg: x must be [2B, C, H, W], got shape {}", shape_of(x)));
  MDD_CHECK(x.size(0) % 2 == 0 && x.size(0) > 0,
          fmt::format("DiT::forward_with_cfg: batch must be even and non-empty (conditional half + "
                      "unconditional half), got {}",
                      x.size(0)));
  const int64_t out_ch = options_.out_channels();
  const int64_t g = guided_channels == kAllEpsChannels
                        ? cfg_guided_channels(CfgGuidance::kAllEpsChannels, options_.in_channels(), out_ch)
                    : guided_channels == kReferenceGuidedChannels
                        ? cfg_guided_channels(CfgGuidance::kReference3Channels, options_.in_channels(), out_ch)
                        : guided_channels;
  MDD_CHECK(g >= 1 && g <= out_ch, fmt::format("DiT::forward_with_cfg: guided_channels {} must be -1 or in [1, {}]",
                                             guided_channels, out_ch));
  const int64_t half = x.size(0) / 2;
  // The reference ignores x[half:] and runs cat([x[:half], x[:half]]) with the full t and y.
  auto first = x.narrow(0, 0, half);
  auto out = forward(torch::cat({first, first}, 0), t, y);
  // Row block 1: guided eps + conditional rest; row block 2: the same guided eps + the
  // unconditional rest (the reference concatenates eps twice with all of `rest`).
  auto guided = cfg_combine(out, cfg_scale, g);
  auto second = g == out_ch ? guided
                            : torch::cat({guided.narrow(1, 0, g), out.narrow(0, half, half).narrow(1, g, out_ch - g)}, 1);
  return torch::cat({guided, second}, 0);
}

}  // namespace mdd
