#include "mdd/models/eval_nets.h"

#include <cmath>
#include <regex>

#include <fmt/format.h>
#include <torch/nn/functional/pooling.h>
#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/normalization.h>

#include "mdd/util/error.h"
#include "models/fused_convnet.h"
#include "util/shape_str.h"

namespace mdd {
namespace {

namespace F = torch::nn::functional;

void check_norm(const std::string& norm) {
  if (norm != "instance" && norm != "batch" && norm != "none") {
    throw Error(fmt::format("eval net: unknown norm '{}' (expected instance, batch or none)", norm));
  }
}

/// The reference `normalization(C, norm_type)`; empty for "none" (the reference's Null module
/// has no parameters, so nothing needs registering).
torch::nn::AnyModule make_norm(const std::string& norm, int64_t channels) {
  if (norm == "instance") {
    // One group per channel: instance norm with a per-channel affine (reference GroupNorm(C, C)).
    return torch::nn::AnyModule(torch::nn::GroupNorm(torch::nn::GroupNormOptions(channels, channels).eps(1e-5)));
  }
  if (norm == "batch") {
    return torch::nn::AnyModule(torch::nn::BatchNorm2d(torch::nn::BatchNorm2dOptions(channels).eps(1e-5).momentum(0.1)));
  }
  return {};
}

torch::Tensor apply_norm(torch::nn::AnyModule& norm, const torch::Tensor& x) {
  if (norm.is_empty()) return x;
  return norm.forward<torch::Tensor>(x);
}

/// PyTorch's default Conv/Linear init (kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), +)).
void default_init(const torch::Tensor& weight, const torch::Tensor& bias, torch::Generator& gen) {
  torch::NoGradGuard no_grad;
  const int64_t fan_in = weight.numel() / weight.size(0);
  const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
  weight.uniform_(-bound, bound, gen);
  if (bias.defined()) bias.uniform_(-bound, bound, gen);
}

/// The ResNet conv init: N(0, sqrt(2 / (k*k*out_channels))); a conv bias (norm "none") keeps
/// the PyTorch default draw, as the reference only touches `weight`.
void resnet_conv_init(const torch::nn::Conv2d& conv, torch::Generator& gen) {
  torch::NoGradGuard no_grad;
  if (conv->bias.defined()) default_init(conv->weight, conv->bias, gen);
  const auto& w = conv->weight;
  const double n = static_cast<double>(w.size(2) * w.size(3) * w.size(0));
  w.normal_(0.0, std::sqrt(2.0 / n), gen);
}

void reset_norm(torch::nn::AnyModule& norm) {
  if (norm.is_empty()) return;
  torch::NoGradGuard no_grad;
  auto module = norm.ptr();
  for (auto& p : module->named_parameters(false)) {
    if (p.key() == "weight") p.value().fill_(1.0);
    if (p.key() == "bias") p.value().zero_();
  }
  for (auto& b : module->named_buffers(false)) {
    if (b.key() == "running_mean") b.value().zero_();
    if (b.key() == "running_var") b.value().fill_(1.0);
    if (b.key() == "num_batches_tracked") b.value().zero_();
  }
}

torch::nn::Conv2d make_conv(int64_t in, int64_t out, int64_t k, int64_t stride, int64_t pad, bool bias) {
  return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, k).stride(stride).padding(pad).bias(bias));
}

std::vector<int64_t> blocks_for_depth(int64_t depth) {
  if (depth == 10) return {1, 1, 1, 1};
  if (depth == 18) return {2, 2, 2, 2};
  if (depth == 34) return {3, 4, 6, 3};
  throw Error(fmt::format("eval net: unsupported ResNet depth {} (BasicBlock depths 10, 18, 34)", depth));
}

}  // namespace

// ------------------------------------------------------------------------------------ ConvNet

ConvNetImpl::ConvNetImpl(ConvNetOptions options) : options_(std::move(options)) {
  const auto& o = options_;
  check_norm(o.norm());
  if (o.depth() < 1 || o.width() < 1 || o.in_channels() < 1 || o.num_classes() < 1) {
    throw Error(fmt::format("ConvNet: bad options depth {} width {} in_channels {} classes {}", o.depth(),
                            o.width(), o.in_channels(), o.num_classes()));
  }
  // The classifier size follows the real geometry. The reference instead treats 28 px as 32 px,
  // which is the same thing for its supported case (1 channel: the first conv pads by 3, 28 -> 32)
  // and would fail to run elsewhere (e.g. 3-channel 28 px); every size it supports gives its shapes.
  int64_t s = o.image_size();
  auto layers = register_module("layers", std::make_shared<torch::nn::Module>());
  auto conv_list = layers->register_module("conv", torch::nn::ModuleList());
  torch::nn::ModuleList norm_list;
  if (o.norm() != "none") norm_list = layers->register_module("norm", torch::nn::ModuleList());
  int64_t in = o.in_channels();
  for (int64_t d = 0; d < o.depth(); ++d) {
    const int64_t pad = (o.in_channels() == 1 && d == 0) ? 3 : 1;
    auto conv = make_conv(in, o.width(), 3, 1, pad, true);
    conv_list->push_back(conv);
    conv_.push_back(conv);
    pad_.push_back(pad);
    if (o.norm() != "none") {
      auto norm = make_norm(o.norm(), o.width());
      norm_list->push_back(norm.ptr());
      norm_.push_back(norm);
      if (o.norm() == "instance") instance_norm_.push_back(norm.get<torch::nn::GroupNorm>());
    }
    in = o.width();
    s = (s + 2 * pad - 2) / 2;  // conv3x3 with padding `pad`, then AvgPool2d(2, 2) (floor)
  }
  if (s < 1) {
    throw Error(fmt::format("ConvNet: image_size {} is too small for depth {} (feature map collapses to 0)",
                            o.image_size(), o.depth()));
  }
  classifier_ = register_module("classifier", torch::nn::Linear(o.width() * s * s, o.num_classes()));
}

torch::Tensor ConvNetImpl::block(int64_t d, torch::Tensor x) {
  const bool normalize = options_.norm() == "instance";
  const bool fuse = options_.fused() && (normalize || options_.norm() == "none") && detail::fused_block_supported(x);
  auto& conv = conv_[d];
  const torch::Tensor gamma = normalize ? instance_norm_[d]->weight : torch::Tensor();
  const torch::Tensor beta = normalize ? instance_norm_[d]->bias : torch::Tensor();
  const double eps = normalize ? instance_norm_[d]->options.eps() : 0.0;
  if (fuse && !x.requires_grad() && x.size(1) <= 4 && x.size(1) == conv->options.in_channels()) {
    // Few input channels: the convolution is cheap and its activation is the largest tensor of
    // the step, so compute it inside the plane loop instead of materialising it.
    return detail::conv_norm_relu_pool(x, conv->weight, conv->bias, pad_[d], gamma, beta, eps, normalize);
  }
  x = conv->forward(x);
  if (fuse && detail::fused_block_supported(x)) return detail::norm_relu_pool(x, gamma, beta, eps, normalize);
  if (!norm_.empty()) x = apply_norm(norm_[d], x);
  x = torch::relu(x);
  return F::avg_pool2d(x, F::AvgPool2dFuncOptions(2).stride(2));
}

torch::Tensor ConvNetImpl::embed(torch::Tensor x) {
  for (int64_t d = 0; d < options_.depth(); ++d) x = block(d, x);
  return x.reshape({x.size(0), -1});
}

torch::Tensor EvalNetImpl::classify(torch::Tensor embedding) {
  throw Error(fmt::format("{}: classify(embedding) is not implemented by this network (an embedding of shape {} was given); "
                          "override EvalNetImpl::classify to use it with GeneratorProxy",
                          name(), shape_str(embedding)));
}

torch::Tensor ConvNetImpl::forward(torch::Tensor x) { return classify(embed(std::move(x))); }

torch::Tensor ConvNetImpl::classify(torch::Tensor e) {
  if (e.dim() != 2 || e.size(1) != classifier_->options.in_features()) {
    throw Error(fmt::format("ConvNet: the input gives features {} but the classifier expects [N, {}] (built for "
                            "image_size {})", c10::str(e.sizes()), classifier_->options.in_features(),
                            options_.image_size()));
  }
  return classifier_->forward(e);
}

std::vector<torch::Tensor> ConvNetImpl::features(torch::Tensor x) {
  std::vector<torch::Tensor> out;
  for (int64_t d = 0; d < options_.depth(); ++d) {
    x = block(d, x);
    out.push_back(x);
  }
  return out;
}

void ConvNetImpl::reset_parameters(torch::Generator generator) {
  for (auto& c : conv_) default_init(c->weight, c->bias, generator);
  for (auto& n : norm_) reset_norm(n);
  default_init(classifier_->weight, classifier_->bias, generator);
}

// ------------------------------------------------------------------------------------ ResNet

ResNetBlockImpl::ResNetBlockImpl(int64_t in_planes, int64_t planes, int64_t stride, const std::string& norm,
                                 bool avg_pool_downsampling)
    : stride_(stride), ap_(avg_pool_downsampling) {
  // ResNetAP convs carry a bias only without normalisation (conv_stride1); the torchvision-style
  // ResNet never has conv biases.
  const bool bias = ap_ && norm == "none";
  conv1_ = register_module("conv1", make_conv(in_planes, planes, 3, ap_ ? 1 : stride, 1, bias));
  bn1_ = make_norm(norm, planes);
  if (!bn1_.is_empty()) register_module("bn1", bn1_.ptr());
  conv2_ = register_module("conv2", make_conv(planes, planes, 3, 1, 1, bias));
  bn2_ = make_norm(norm, planes);
  if (!bn2_.is_empty()) register_module("bn2", bn2_.ptr());
  if (stride != 1 || in_planes != planes) {
    has_down_ = true;
    auto down = register_module("downsample", std::make_shared<torch::nn::Module>());
    // ResNetAP: Sequential(conv1x1 s1, AvgPool(s), norm) -> keys 0 and 2;
    // ResNet:   Sequential(conv1x1 stride s, norm)       -> keys 0 and 1.
    down_conv_ = down->register_module("0", make_conv(in_planes, planes, 1, ap_ ? 1 : stride, 0, bias));
    down_norm_ = make_norm(norm, planes);
    if (!down_norm_.is_empty()) down->register_module(ap_ ? "2" : "1", down_norm_.ptr());
  }
}

torch::Tensor ResNetBlockImpl::forward(torch::Tensor x) {
  auto out = torch::relu(apply_norm(bn1_, conv1_->forward(x)));
  if (ap_ && stride_ != 1) out = F::avg_pool2d(out, F::AvgPool2dFuncOptions(stride_).stride(stride_));
  out = apply_norm(bn2_, conv2_->forward(out));
  torch::Tensor residual = x;
  if (has_down_) {
    residual = down_conv_->forward(x);
    if (ap_ && stride_ != 1) residual = F::avg_pool2d(residual, F::AvgPool2dFuncOptions(stride_).stride(stride_));
    residual = apply_norm(down_norm_, residual);
  }
  return torch::relu(out + residual);
}

ResNetImpl::ResNetImpl(ResNetOptions options) : options_(std::move(options)) {
  const auto& o = options_;
  check_norm(o.norm());
  const auto blocks = blocks_for_depth(o.depth());
  if (o.width() < 1 || o.in_channels() < 1 || o.num_classes() < 1 || o.image_size() < 1) {
    throw Error(fmt::format("ResNet: bad options width {} in_channels {} classes {} image_size {}", o.width(),
                            o.in_channels(), o.num_classes(), o.image_size()));
  }
  const bool ap = o.avg_pool_downsampling();
  size_ = o.image_size() <= 64 ? "small" : (o.image_size() <= 128 ? "mid" : "large");
  const bool bias = ap && o.norm() == "none";
  auto layer0 = register_module("layer0", std::make_shared<torch::nn::Module>());
  if (size_ == "large") {
    conv1_ = ap ? make_conv(o.in_channels(), o.width(), 7, 1, 3, bias) : make_conv(o.in_channels(), o.width(), 7, 2, 3, false);
  } else {
    conv1_ = make_conv(o.in_channels(), o.width(), 3, 1, 1, bias);
  }
  layer0->register_module("conv1", conv1_);
  bn1_ = make_norm(o.norm(), o.width());
  if (!bn1_.is_empty()) layer0->register_module("bn1", bn1_.ptr());
  int64_t in = o.width();
  for (int64_t s = 0; s < 4; ++s) {
    const int64_t planes = o.width() << s;
    torch::nn::Sequential stage;
    for (int64_t b = 0; b < blocks[s]; ++b) {
      const int64_t stride = (b == 0 && s > 0) ? 2 : 1;
      stage->push_back(ResNetBlock(in, planes, stride, o.norm(), ap));
      in = planes;
    }
    stages_.push_back(register_module(fmt::format("layer{}", s + 1), stage));
  }
  fc_ = register_module("fc", torch::nn::Linear(in, o.num_classes()));
}

torch::Tensor ResNetImpl::stem(torch::Tensor x) {
  x = torch::relu(apply_norm(bn1_, conv1_->forward(x)));
  if (size_ == "small") return x;
  if (options_.avg_pool_downsampling()) {
    const int64_t k = size_ == "large" ? 4 : 2;
    return F::avg_pool2d(x, F::AvgPool2dFuncOptions(k).stride(k));
  }
  return F::max_pool2d(x, F::MaxPool2dFuncOptions(3).stride(2).padding(1));
}

std::vector<torch::Tensor> ResNetImpl::features(torch::Tensor x) {
  std::vector<torch::Tensor> out;
  x = stem(x);
  out.push_back(x);
  for (auto& stage : stages_) {
    x = stage->forward(x);
    out.push_back(x);
  }
  // Reference head: F.avg_pool2d(x, x.shape[-1]) (global for square maps), then flatten.
  const int64_t k = x.size(-1);
  x = F::avg_pool2d(x, F::AvgPool2dFuncOptions(k)).reshape({x.size(0), -1});
  out.push_back(x);
  return out;
}

torch::Tensor ResNetImpl::embed(torch::Tensor x) { return features(std::move(x)).back(); }

torch::Tensor ResNetImpl::forward(torch::Tensor x) { return classify(embed(std::move(x))); }

torch::Tensor ResNetImpl::classify(torch::Tensor embedding) {
  if (embedding.dim() != 2 || embedding.size(1) != fc_->options.in_features())
    throw Error(fmt::format("ResNet: classify expects [N, {}] embeddings, got {}", fc_->options.in_features(),
                            c10::str(embedding.sizes())));
  return fc_->forward(embedding);
}

void ResNetImpl::reset_parameters(torch::Generator generator) {
  // Module order as the reference's `self.modules()` loop; the fc keeps PyTorch's default.
  resnet_conv_init(conv1_, generator);
  reset_norm(bn1_);
  for (auto& stage : stages_) {
    for (auto& m : stage->children()) {
      auto* block = dynamic_cast<ResNetBlockImpl*>(m.get());
      resnet_conv_init(block->conv1_, generator);
      reset_norm(block->bn1_);
      resnet_conv_init(block->conv2_, generator);
      reset_norm(block->bn2_);
      if (block->has_down_) {
        resnet_conv_init(block->down_conv_, generator);
        reset_norm(block->down_norm_);
      }
    }
  }
  default_init(fc_->weight, fc_->bias, generator);
}

// ------------------------------------------------------------------------------------ factory

torch::nn::AnyModule make_eval_net(const std::string& name, int64_t num_classes, int64_t image_size,
                                   const std::string& norm, int64_t width, int64_t in_channels) {
  check_norm(norm);
  if (num_classes < 1 || image_size < 1 || width < 0 || in_channels < 1) {
    throw Error(fmt::format("make_eval_net('{}'): bad num_classes {} / image_size {} / width {} / in_channels {}",
                            name, num_classes, image_size, width, in_channels));
  }
  std::smatch m;
  static const std::regex convnet_re("convnet([0-9]+)?");
  static const std::regex resnet_ap_re("resnet_ap([0-9]+)?");
  static const std::regex resnet_re("resnet([0-9]+)");
  if (std::regex_match(name, m, convnet_re)) {
    const int64_t depth = m[1].matched ? std::stoll(m[1].str()) : 3;
    if (depth < 1 || depth > 16) throw Error(fmt::format("make_eval_net: bad ConvNet depth in '{}'", name));
    auto o = ConvNetOptions(num_classes, depth).width(width == 0 ? 128 : width).norm(norm)
                 .in_channels(in_channels).image_size(image_size);
    return torch::nn::AnyModule(ConvNet(o));
  }
  const bool ap = std::regex_match(name, m, resnet_ap_re);
  if (ap || std::regex_match(name, m, resnet_re)) {
    const int64_t depth = m[1].matched ? std::stoll(m[1].str()) : 10;
    auto o = ResNetOptions(num_classes, depth).width(width == 0 ? 64 : width).norm(norm)
                 .in_channels(in_channels).image_size(image_size).avg_pool_downsampling(ap);
    auto net = ResNet(o);
    // Apply the reference ResNet init (the constructor left PyTorch's defaults) from the global
    // RNG, as the reference constructor does.
    net->reset_parameters(torch::Generator(at::detail::getDefaultCPUGenerator()));
    return torch::nn::AnyModule(net);
  }
  throw Error(fmt::format("make_eval_net: unknown network '{}' (expected convnet<depth>, resnet_ap<depth>, "
                          "resnet<depth>)", name));
}

EvalNetImpl* as_eval_net(const torch::nn::AnyModule& net) {
  if (net.is_empty()) throw Error("as_eval_net: empty module");
  auto* p = dynamic_cast<EvalNetImpl*>(net.ptr().get());
  if (!p) throw Error("as_eval_net: the module is not an mdd evaluation network");
  return p;
}

}  // namespace mdd
