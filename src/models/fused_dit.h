// Fused CPU kernels for the DiT block and final layer: inference, and training as autograd functions.
//
// Why: at Fashion-MNIST sizes (49 tokens, width 96, batch 200 in CFG sampling) a DiT forward
// spends about half its time outside the matrix products. PyTorch's profile of the demo
// generator's forward (2.11, one thread, Zen 4): tanh-GELU 18 %, flash attention 12 % (its CPU
// kernel is tuned for long sequences), copies from head permutes 11 %, LayerNorm, modulate, gates
// and residual adds 11 %. These kernels do each of those in one pass: LayerNorm + modulate per
// token row, GELU in place, attention per (sample, head) read straight from the qkv product and
// written straight in the layout the output projection reads, gate + DiffFit gammas + residual
// add in one. In bf16 mode the activations that feed matrix products are written in bf16 by the
// kernel before them (no separate casts), the residual stream and all statistics stay float32.
// Same maths as the module path (tested against it); only float summation order differs.
// Training runs the same forward kernels (keeping LayerNorm's and softmax's row statistics) with
// hand-written backward kernels, so autograd records six nodes per block (besides the products) for what the module
// path records as about twenty elementwise ops, and keeps fewer intermediates alive.
#pragma once

#include <torch/types.h>

namespace mdd {
class DiTBlockImpl;
class FinalLayerImpl;

namespace detail {

/// Which fused path a DiT forward may take right now.
enum class FusedDiTMode {
  kNone,  ///< the module path (autograd records, a non-CPU or non-float32 model, fp16 autocast, ...)
  kFP32,  ///< float32 throughout
  kBF16,  ///< CPU bf16 autocast is on: matrix products in bfloat16, everything else float32
};

/// The mode for input `x` [B, N, D] and a model weight `w`: fused only on CPU float32 tensors
/// while autograd does not record (no-grad or inference mode) and autocast is off or CPU bf16.
FusedDiTMode fused_dit_mode(const torch::Tensor& x, const torch::Tensor& w);

/// DiTBlock::forward through the fused kernels (same result as the module path).
torch::Tensor fused_block_forward(DiTBlockImpl& block, const torch::Tensor& x, const torch::Tensor& c,
                                  FusedDiTMode mode);

/// FinalLayer::forward through the fused kernels. In kBF16 mode the result is bfloat16, as the
/// module path's under autocast.
torch::Tensor fused_final_forward(FinalLayerImpl& layer, const torch::Tensor& x, const torch::Tensor& c,
                                  FusedDiTMode mode);

// The kernels, exposed for their tests. All take contiguous CPU tensors as documented.

/// LayerNorm over the last dim (no affine, `eps`) then modulate: norm(x) * (1 + scale[b]) + shift[b].
/// x float [B, N, D]; shift, scale float [B, D] (rows may be strided, e.g. chunks of one [B, 6D]).
/// Result [B, N, D] in `out_dtype` (float or bfloat16).
torch::Tensor ln_modulate(const torch::Tensor& x, const torch::Tensor& shift, const torch::Tensor& scale, double eps,
                          torch::ScalarType out_dtype);

/// GELU with the tanh approximation, in place on a contiguous float or bfloat16 tensor; returns it.
/// With `bias` (float [W], W = h's last dim) it computes gelu(h + bias): the bias of the product
/// that wrote h, left out of that product.
torch::Tensor gelu_tanh_(torch::Tensor h, const torch::Tensor& bias = {});

/// Multi-head self-attention softmax(q k^T / sqrt(hd)) v from the qkv product [B, N, 3D] (float or
/// bfloat16; channel s*D + h*hd + d is part s in {q, k, v}, head h, dim d). `gamma` [3D] (float,
/// optional) scales the channels first (DiffFit's attn.gamma1); `bias` [3D] (float, optional) is
/// added to qkv before that (the qkv Linear's bias, left out of the product). Result [B, N, D] (heads
/// concatenated, the layout `proj` reads) in qkv's dtype.
torch::Tensor attention_from_qkv(const torch::Tensor& qkv, int64_t heads, const torch::Tensor& gamma,
                                 const torch::Tensor& bias = {});

/// Whether this build and CPU can run bf16 inference attention on bf16 dot products (AVX512_BF16,
/// GCC x86-64 Linux builds): q, k, v and the probabilities rounded to bf16, products accumulated in
/// float32, as bf16 autocast matmuls do; twice the float FMA rate. attention_from_qkv uses it for
/// bf16 qkv with an even head dim <= 128 (not on the training path, whose backward recomputes the
/// float32 kernel's probabilities).
bool bf16_dot_attention_available();

/// Allows (default) or forbids that path process-wide; returns the previous setting. For tests and
/// side-by-side benchmarks of the two kernels.
bool set_bf16_dot_attention(bool enable);

/// x + (outer * gate[b]) * (inner * (a + bias)): the gated residual add of a DiT block with its
/// DiffFit gammas. x float [B, N, D]; a float or bfloat16 [B, N, D]; gate float [B, D] (strided rows
/// ok); outer, inner float [D] or undefined (= 1); bias float [D] or undefined (= 0: the bias of the
/// product that wrote a, left out of it). Returns a new float tensor.
torch::Tensor gated_residual(const torch::Tensor& x, const torch::Tensor& gate, const torch::Tensor& outer,
                             const torch::Tensor& a, const torch::Tensor& inner, const torch::Tensor& bias = {});

// ---- training: the same kernels as autograd functions with hand-written backward kernels.

/// The mode for a forward that autograd records: CPU float32 `x` and weight `w`, grad mode on,
/// autocast off (kFP32) or CPU bf16 (kBF16); kNone otherwise (no-grad, CUDA, fp16, ...).
FusedDiTMode fused_dit_train_mode(const torch::Tensor& x, const torch::Tensor& w);

/// DiTBlock::forward for training: the products are the modules' own Linear calls, LayerNorm +
/// modulate, attention, GELU and the gated residual adds are the autograd functions below.
torch::Tensor fused_block_forward_train(DiTBlockImpl& block, const torch::Tensor& x, const torch::Tensor& c,
                                        FusedDiTMode mode);

/// FinalLayer::forward for training (LayerNorm + modulate as below, then the Linear).
torch::Tensor fused_final_forward_train(FinalLayerImpl& layer, const torch::Tensor& x, const torch::Tensor& c,
                                        FusedDiTMode mode);

/// ln_modulate with a backward to x, shift and scale; bfloat16 result when `bf16_out`.
torch::Tensor ln_modulate_train(const torch::Tensor& x, const torch::Tensor& shift, const torch::Tensor& scale,
                                double eps, bool bf16_out);

/// gated_residual with a backward to x, gate, outer, a and inner (a's gradient in a's dtype).
torch::Tensor gated_residual_train(const torch::Tensor& x, const torch::Tensor& gate, const torch::Tensor& outer,
                                   const torch::Tensor& a, const torch::Tensor& inner);

/// GELU (tanh approximation) out of place with a backward; float or bfloat16.
torch::Tensor gelu_tanh_train(const torch::Tensor& h);

/// attention_from_qkv with a backward to qkv (in qkv's dtype) and gamma (float [3D]). Keeps only
/// qkv and each softmax row's max and 1 / sum; the backward recomputes the probabilities.
torch::Tensor attention_train(const torch::Tensor& qkv, int64_t heads, const torch::Tensor& gamma);

}  // namespace detail
}  // namespace mdd
