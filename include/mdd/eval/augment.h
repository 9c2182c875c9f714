#pragma once
/// \file
/// Train-time augmentation of the IDC / Minimax-Diffusion evaluation protocol on batched float
/// tensors [N, C, H, W] (values in [0, 1] before normalisation), and the test transform.
/// Every op draws its randomness from an explicit generator; each sample gets its own draw, as the
/// reference's per-sample torchvision transforms do (data.py:296-350, misc/utils.py:170-289).

#include <array>
#include <cstdint>
#include <vector>

#include <torch/types.h>

#include "mdd/export.h"

namespace mdd {

/// torchvision RandomResizedCrop per sample: area fraction ~ U(scale), log aspect ~ U(log ratio),
/// up to 10 tries then a centre crop of the clamped ratio; the crop is resized (bilinear,
/// align_corners = false, no antialias, as torchvision on tensors) to `size` x `size`.
MDD_API torch::Tensor random_resized_crop(const torch::Tensor& images, int64_t size, torch::Generator generator,
                                          std::array<double, 2> scale = {0.5, 1.0},
                                          std::array<double, 2> ratio = {3.0 / 4.0, 4.0 / 3.0});

/// Flips each sample horizontally with probability `p`.
MDD_API torch::Tensor random_horizontal_flip(const torch::Tensor& images, torch::Generator generator, double p = 0.5);

/// IDC's ColorJitter (misc/utils.py:240-289): brightness, contrast and saturation as lerps
/// `img.lerp(target, alpha)`, alpha ~ U(-v, v), in a per-sample random order. Brightness target
/// is 0, contrast target the mean grey level, saturation target the grey image
/// (0.299 R + 0.587 G + 0.114 B). Grey-scale (1-channel) images use the channel itself as grey.
MDD_API torch::Tensor color_jitter(const torch::Tensor& images, torch::Generator generator, double brightness = 0.4,
                                   double contrast = 0.4, double saturation = 0.4);

/// AlexNet PCA lighting noise (misc/utils.py:207-228) with the ImageNet eigen-decomposition:
/// per sample alpha ~ N(0, alphastd)^3, adds (eigvec * alpha * eigval).sum(1) per RGB channel.
/// Requires 3 channels.
MDD_API torch::Tensor lighting(const torch::Tensor& images, torch::Generator generator, double alphastd = 0.1);

/// Per-channel (x - mean) / std.
MDD_API torch::Tensor normalize_batch(const torch::Tensor& images, const std::vector<double>& mean, const std::vector<double>& std);

/// The result of CutMix on a batch: mixed images, both label sets and the label weight `ratio`
/// (the loss is CE(y_a) * ratio + CE(y_b) * (1 - ratio)).
struct MDD_API CutMixBatch {
  torch::Tensor images, labels_a, labels_b;
  double ratio = 1.0;
  int64_t x1 = 0, y1 = 0, x2 = 0, y2 = 0;  ///< the box (dim 2 range [x1,x2), dim 3 range [y1,y2))
  double lambda = 1.0;                     ///< the Beta draw
};

/// The reference CutMix (train.py:185-197, misc/utils.py rand_bbox): lambda ~ Beta(beta, beta),
/// a random permutation of the batch, cut ratio sqrt(1 - lambda), cut sizes int(W * cut) and
/// int(H * cut), centre uniform in [0, W) x [0, H), box clipped to the image, patch pasted from
/// the permuted batch; ratio = 1 - box_area / (H * W) after clipping.
MDD_API CutMixBatch cutmix(const torch::Tensor& images, const torch::Tensor& labels, torch::Generator generator,
                           double beta = 1.0);

/// Resize shorter side to `size` (bilinear, antialiased) + centre crop `size` x `size`: the test
/// transform's geometry (Resize(size) + CenterCrop(size)); a no-op when already size x size.
MDD_API torch::Tensor resize_center_crop(const torch::Tensor& images, int64_t size);

/// Everything the IDC train transform does to a [0, 1] batch before CutMix:
/// RandomResizedCrop(size, 0.5-1) -> flip -> ColorJitter(0.4) -> Lighting(0.1) -> Normalize.
MDD_API torch::Tensor idc_train_transform(const torch::Tensor& images, int64_t size, const std::vector<double>& mean,
                                          const std::vector<double>& std, torch::Generator generator);

/// The test transform: resize_center_crop(size) -> Normalize.
MDD_API torch::Tensor test_transform(const torch::Tensor& images, int64_t size, const std::vector<double>& mean,
                                     const std::vector<double>& std);

}  // namespace mdd
