#pragma once
/// \file
/// The evaluation classifiers of the IDC / Minimax-Diffusion protocol: ConvNet-D, ResNetAP-D and
/// ResNet-D (models/{convnet,resnet_ap,resnet}.py of snu-mllab/Efficient-Dataset-Condensation,
/// identical to vimar-gu/MinimaxDiffusion train_models/). Parameter and buffer names equal the
/// reference state_dict keys, so reference checkpoints load with `strict = true`.
///
/// Normalisation: "instance" = GroupNorm(C, C) (eps 1e-5, affine), "batch" = BatchNorm2d
/// (eps 1e-5, momentum 0.1), "none" = no normalisation layer.

#include <cstdint>
#include <string>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/modules/container/any.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/types.h>

#include "mdd/export.h"

namespace mdd {

/// Common interface of the evaluation networks, so that code holding a `torch::nn::AnyModule`
/// (what `make_eval_net` returns) can reach the embedding used by coreset selection and MMD.
class MDD_API EvalNetImpl : public torch::nn::Module {
 public:
  /// Logits [N, num_classes] for images [N, C, H, W] (normalised).
  virtual torch::Tensor forward(torch::Tensor x) = 0;
  /// The penultimate embedding [N, D] that the classifier consumes (ConvNet: the flattened last
  /// block; ResNets: the globally average-pooled last stage).
  virtual torch::Tensor embed(torch::Tensor x) = 0;
  /// Logits from an `embed` output: `forward(x) == classify(embed(x))`, so callers that need both
  /// (the generator proxy) run the network once. Not pure, so that a network written against the
  /// earlier interface still compiles; the default throws mdd::Error naming what is missing.
  virtual torch::Tensor classify(torch::Tensor embedding);
  /// The reference's `get_feature(x, 0, last)` list: the output of every block / stage.
  virtual std::vector<torch::Tensor> features(torch::Tensor x) = 0;
  /// Re-draws every parameter with the reference initialisation from `generator` (buffers are
  /// reset to their defaults), so a training run is reproducible without the global RNG.
  virtual void reset_parameters(torch::Generator generator) = 0;
};

/// Options of the IDC ConvNet (models/convnet.py): `depth` x [conv3x3 (bias) -> norm -> ReLU ->
/// AvgPool2d(2, 2)] then a Linear classifier on the flattened map (no global pooling, so the
/// classifier size depends on `image_size`; a 1-channel input gets padding 3 in the first conv as
/// in the reference, so 28 px grey images run at 32 px like the reference's "28 is treated as 32").
struct MDD_API ConvNetOptions {
  ConvNetOptions(int64_t num_classes, int64_t depth) : num_classes_(num_classes), depth_(depth) {}
  TORCH_ARG(int64_t, num_classes);
  TORCH_ARG(int64_t, depth);
  TORCH_ARG(int64_t, width) = 128;
  TORCH_ARG(std::string, norm) = "instance";
  TORCH_ARG(int64_t, in_channels) = 3;
  TORCH_ARG(int64_t, image_size) = 32;
  /// On float32 CPU tensors with norm "instance" or "none", run each block's norm -> ReLU -> pool
  /// (and a first conv with at most 4 input channels that needs no input gradient) as fused
  /// kernels: the same maths (tested against the unfused modules), about 2x faster `dc` training.
  /// Other devices, dtypes and batch norm always take the module path.
  TORCH_ARG(bool, fused) = true;
};

/// The IDC ConvNet. Keys: layers.conv.<d>.{weight,bias}, layers.norm.<d>.*, classifier.*.
class MDD_API ConvNetImpl : public EvalNetImpl {
 public:
  explicit ConvNetImpl(ConvNetOptions options);
  torch::Tensor forward(torch::Tensor x) override;
  torch::Tensor embed(torch::Tensor x) override;
  torch::Tensor classify(torch::Tensor embedding) override;
  std::vector<torch::Tensor> features(torch::Tensor x) override;
  void reset_parameters(torch::Generator generator) override;
  /// The options this network was built with.
  const ConvNetOptions& options() const { return options_; }

 private:
  torch::Tensor block(int64_t d, torch::Tensor x);
  ConvNetOptions options_;
  std::vector<torch::nn::Conv2d> conv_;
  std::vector<int64_t> pad_;                // first-conv padding per block
  std::vector<torch::nn::AnyModule> norm_;  // empty for norm "none"
  std::vector<torch::nn::GroupNorm> instance_norm_;  // the same modules, typed, for the fused path
  torch::nn::Linear classifier_{nullptr};
};
TORCH_MODULE(ConvNet);

/// Options of the IDC ResNets. `avg_pool_downsampling` = ResNetAP (models/resnet_ap.py:
/// stride-1 convs, avg-pool downsampling, 7x7 stride-1 stem + AvgPool(4) for "large");
/// otherwise the torchvision-style ResNet (models/resnet.py: stride-2 convs, 7x7 stride-2 stem +
/// MaxPool(3, 2, 1)). The stem follows `image_size` like the reference: "small" (<= 64,
/// conv3x3 only), "mid" (<= 128, conv3x3 + pool), "large" (> 128).
struct MDD_API ResNetOptions {
  ResNetOptions(int64_t num_classes, int64_t depth) : num_classes_(num_classes), depth_(depth) {}
  TORCH_ARG(int64_t, num_classes);
  TORCH_ARG(int64_t, depth);                 ///< 10, 18 or 34 (BasicBlock configurations)
  TORCH_ARG(int64_t, width) = 64;            ///< channels of the stem and stage 1 (x2 per stage)
  TORCH_ARG(std::string, norm) = "instance";
  TORCH_ARG(int64_t, in_channels) = 3;
  TORCH_ARG(int64_t, image_size) = 224;
  TORCH_ARG(bool, avg_pool_downsampling) = true;
};

/// One BasicBlock (both variants). Keys conv1, bn1, conv2, bn2, downsample.{0,1|2}.
class MDD_API ResNetBlockImpl : public torch::nn::Module {
 public:
  ResNetBlockImpl(int64_t in_planes, int64_t planes, int64_t stride, const std::string& norm,
                  bool avg_pool_downsampling);
  torch::Tensor forward(torch::Tensor x);

 private:
  friend class ResNetImpl;
  int64_t stride_;
  bool ap_;
  torch::nn::Conv2d conv1_{nullptr}, conv2_{nullptr}, down_conv_{nullptr};
  torch::nn::AnyModule bn1_, bn2_, down_norm_;  // empty when norm is "none"
  bool has_down_ = false;
};
TORCH_MODULE(ResNetBlock);

/// ResNetAP-D / ResNet-D of the IDC code (layer0 stem, layer1..4, global avg-pool, fc).
class MDD_API ResNetImpl : public EvalNetImpl {
 public:
  explicit ResNetImpl(ResNetOptions options);
  torch::Tensor forward(torch::Tensor x) override;
  torch::Tensor embed(torch::Tensor x) override;
  torch::Tensor classify(torch::Tensor embedding) override;
  std::vector<torch::Tensor> features(torch::Tensor x) override;
  void reset_parameters(torch::Generator generator) override;
  /// The options this network was built with.
  const ResNetOptions& options() const { return options_; }

 private:
  torch::Tensor stem(torch::Tensor x);
  ResNetOptions options_;
  std::string size_;  // "small" | "mid" | "large"
  torch::nn::Conv2d conv1_{nullptr};
  torch::nn::AnyModule bn1_;
  std::vector<torch::nn::Sequential> stages_;
  torch::nn::Linear fc_{nullptr};
};
TORCH_MODULE(ResNet);

/// Builds an evaluation network by name: "convnet<depth>" (e.g. "convnet3", "convnet6"),
/// "resnet_ap<depth>" (10, 18, 34; "resnet_ap" = 10) and "resnet<depth>" (10, 18, 34).
/// `norm`: "instance" | "batch" | "none". `width` = base channel count, 0 = the reference width
/// (128 for ConvNet, 64 for the ResNets). `image_size` selects the ConvNet classifier size and the
/// ResNet stem. `in_channels` (an addition to the contract, default 3) is the number of input
/// channels: 1 builds the reference's grey-scale ConvNet (first conv padding 3).
/// Parameters use the reference initialisation drawn from the global torch RNG; call
/// `as_eval_net(net)->reset_parameters(gen)` for a generator-driven draw.
/// Unknown names, norms or bad sizes throw mdd::Error.
MDD_API torch::nn::AnyModule make_eval_net(const std::string& name, int64_t num_classes, int64_t image_size,
                                           const std::string& norm = "instance", int64_t width = 0,
                                           int64_t in_channels = 3);

/// The EvalNetImpl behind an AnyModule made by `make_eval_net` (throws mdd::Error otherwise).
MDD_API EvalNetImpl* as_eval_net(const torch::nn::AnyModule& net);

}  // namespace mdd
