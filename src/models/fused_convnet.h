// Fused CPU kernels for the ConvNet block conv3x3 -> instance norm -> ReLU -> AvgPool2d(2).
//
// Why: the `dc` protocol trains ConvNet-3 on 28/32 px images, where the block's element-wise tail
// (GroupNorm(C, C), ReLU, average pooling and their backward passes) moves several times more
// memory than the convolutions compute, and the 1-channel first layer's [N, 128, 32, 32]
// activations (52 MB at batch 100) are the largest tensors of the step. These kernels do the tail
// per (sample, channel) plane while it sits in L1, and the first layer additionally computes its
// small convolution inside the plane loop, so its activation is never materialised. Same maths as
// the unfused modules (tested against them); only the float summation order differs.
#pragma once

#include <torch/types.h>

namespace mdd::detail {

/// Instance norm (per-plane biased variance, affine `gamma`/`beta` [C]) -> ReLU -> AvgPool2d(2, 2)
/// (floor) on a float CPU tensor [N, C, H, W]; differentiable in x, gamma and beta. With
/// `normalize` false the norm is skipped (gamma/beta must be undefined): ReLU -> pool only.
torch::Tensor norm_relu_pool(const torch::Tensor& x, const torch::Tensor& gamma, const torch::Tensor& beta,
                             double eps, bool normalize);

/// conv2d(x, weight, bias, stride 1, padding `pad`, 3x3) followed by `norm_relu_pool`, for inputs
/// with few channels. Differentiable in weight, bias, gamma and beta; x must not require grad
/// (callers use the unfused path then).
torch::Tensor conv_norm_relu_pool(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                                  int64_t pad, const torch::Tensor& gamma, const torch::Tensor& beta, double eps,
                                  bool normalize);

/// Whether the fused kernels apply: float32 contiguous-able CPU tensors with H, W >= 2.
bool fused_block_supported(const torch::Tensor& x);

}  // namespace mdd::detail
