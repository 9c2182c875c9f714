// Golden parity and key lists of the IDC evaluation networks (ConvNet-6, ResNetAP-10, ResNet-18).
#include <fstream>
#include <tuple>

#include <nlohmann/json.hpp>

#include "mdd/io/state_dict.h"
#include "mdd/models/eval_nets.h"
#include "mdd/util/error.h"
#include "test_util.h"

namespace {

using json = nlohmann::json;

json read_json(const std::string& name) {
  std::ifstream f(mdd_test::data_path(name));
  return json::parse(f);
}

struct Tol {
  double atol, rtol;
};

Tol manifest_tolerance(const std::string& case_name) {
  const json m = read_json("MANIFEST_vae_eval.json");
  const auto& t = m.at("cases").at(case_name).at("suggested_tolerance");
  return {t.at("atol").get<double>(), t.at("rtol").get<double>()};
}

/// numpy.allclose semantics (|got - ref| <= atol + rtol*|ref|), the MANIFEST's tolerance rule.
::testing::AssertionResult NpAllClose(const torch::Tensor& got, const torch::Tensor& ref, Tol tol) {
  if (got.sizes() != ref.sizes()) {
    return ::testing::AssertionFailure() << "shape " << got.sizes() << " != " << ref.sizes();
  }
  auto g = got.detach().to(torch::kFloat64), r = ref.detach().to(torch::kFloat64);
  auto excess = (g - r).abs() - (tol.atol + tol.rtol * r.abs());
  const double worst = excess.max().item<double>();
  const double err = (g - r).abs().max().item<double>();
  if (worst > 0) return ::testing::AssertionFailure() << "max abs err " << err << " exceeds atol/rtol";
  return ::testing::AssertionSuccess() << "max abs err " << err;
}

/// PyTorch state_dict order: per module its parameters, then its buffers, then its children.
void ordered_keys(const torch::nn::Module& m, const std::string& prefix,
                  std::vector<std::pair<std::string, torch::Tensor>>& out) {
  for (const auto& p : m.named_parameters(false)) out.emplace_back(prefix + p.key(), p.value());
  for (const auto& b : m.named_buffers(false)) out.emplace_back(prefix + b.key(), b.value());
  for (const auto& c : m.named_children()) ordered_keys(*c.value(), prefix + c.key() + ".", out);
}

struct GoldenCase {
  std::string name, net, norm;
  int64_t image_size, width;
  std::vector<int> feats;  // which feat.<i> the io file holds
};
// Printed by name so ctest's discovered test names are stable (not raw object bytes).
void PrintTo(const GoldenCase& c, std::ostream* os) { *os << c.name; }

class EvalNetGolden : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(EvalNetGolden, MatchesReference) {
  const auto& c = GetParam();
  torch::manual_seed(0);
  auto net = mdd::make_eval_net(c.net, 10, c.image_size, c.norm, c.width);
  auto* impl = mdd::as_eval_net(net);
  mdd::load_state_dict(*impl, mdd_test::golden(c.name + ".weights.safetensors"), /*strict=*/true);
  const auto io = mdd_test::golden(c.name + ".io.safetensors");
  const Tol tol = manifest_tolerance(c.name);
  impl->eval();
  torch::NoGradGuard no_grad;
  const auto& x = io.at("x");
  const auto logits = net.forward<torch::Tensor>(x);
  EXPECT_TRUE(NpAllClose(logits, io.at("logits"), tol)) << c.name << " logits";
  RecordProperty("logits_max_abs_err", std::to_string(mdd_test::max_abs_diff(logits, io.at("logits"))));
  const auto feats = impl->features(x);
  for (int i : c.feats) {
    EXPECT_TRUE(NpAllClose(feats.at(i), io.at("feat." + std::to_string(i)), tol)) << c.name << " feat." << i;
  }
  if (io.count("feat_flat")) EXPECT_TRUE(NpAllClose(impl->embed(x), io.at("feat_flat"), tol)) << "feat_flat";
  if (io.count("train.logits")) {
    impl->train();
    EXPECT_TRUE(NpAllClose(impl->forward(x), io.at("train.logits"), tol)) << "train.logits";
    const auto sd = mdd::state_dict(*impl);
    int checked = 0;
    for (const auto& kv : io) {
      const std::string pre = "train.after.";
      if (kv.first.rfind(pre, 0) != 0) continue;
      const auto& got = sd.at(kv.first.substr(pre.size()));
      if (got.scalar_type() == torch::kLong) {
        EXPECT_EQ(got.item<int64_t>(), kv.second.item<int64_t>()) << kv.first;
      } else {
        EXPECT_TRUE(NpAllClose(got, kv.second, tol)) << kv.first;
      }
      ++checked;
    }
    EXPECT_GT(checked, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, EvalNetGolden,
    ::testing::Values(GoldenCase{"evalnet_convnet6", "convnet6", "instance", 80, 32, {2, 3, 4, 5}},
                      GoldenCase{"evalnet_resnet_ap10", "resnet_ap10", "instance", 224, 8, {0, 1, 2, 3, 4, 5}},
                      GoldenCase{"evalnet_resnet18", "resnet18", "instance", 224, 8, {0, 1, 2, 3, 4, 5}},
                      GoldenCase{"evalnet_resnet_ap10_bn", "resnet_ap10", "batch", 224, 8, {0, 1, 2, 3, 4, 5}}),
    [](const auto& info) { return info.param.name; });

struct KeysCase {
  std::string file, net;
};
void PrintTo(const KeysCase& c, std::ostream* os) { *os << c.file; }
class EvalNetKeys : public ::testing::TestWithParam<KeysCase> {};

TEST_P(EvalNetKeys, FullSizeKeysAndShapes) {
  const auto& c = GetParam();
  const json keys = read_json(c.file);
  for (const std::string norm : {"instance", "batch"}) {
    const auto& spec = keys.at(norm);
    auto net = mdd::make_eval_net(c.net, 10, 224, norm);
    auto* impl = mdd::as_eval_net(net);
    std::vector<std::pair<std::string, torch::Tensor>> got;
    ordered_keys(*impl, "", got);
    const auto& expected = spec.at("state_dict");
    ASSERT_EQ(got.size(), expected.size()) << c.net << " " << norm;
    ASSERT_EQ(static_cast<int64_t>(got.size()), spec.at("state_dict_entries").get<int64_t>());
    for (size_t i = 0; i < got.size(); ++i) {
      EXPECT_EQ(got[i].first, expected[i][0].get<std::string>()) << "entry " << i;
      EXPECT_EQ(got[i].second.sizes().vec(), expected[i][1].get<std::vector<int64_t>>()) << got[i].first;
      const std::string dtype = got[i].second.scalar_type() == torch::kLong ? "int64" : "float32";
      EXPECT_EQ(dtype, expected[i][2].get<std::string>()) << got[i].first;
    }
    int64_t params = 0;
    for (const auto& p : impl->parameters()) params += p.numel();
    EXPECT_EQ(params, spec.at("param_count").get<int64_t>());
    // Output and per-stage feature shapes for one 224 px image.
    impl->eval();
    torch::NoGradGuard no_grad;
    auto x = torch::randn({1, 3, 224, 224});
    EXPECT_EQ(net.forward<torch::Tensor>(x).sizes().vec(), spec.at("output_shape_for_[1,3,224,224]").get<std::vector<int64_t>>());
    const auto shapes = spec.at("get_feature_shapes_for_[1,3,224,224]").get<std::vector<std::vector<int64_t>>>();
    const auto feats = impl->features(x);
    for (size_t i = 0; i < shapes.size() && i < feats.size(); ++i) EXPECT_EQ(feats[i].sizes().vec(), shapes[i]) << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Nets, EvalNetKeys,
                         ::testing::Values(KeysCase{"evalnet_convnet6.keys.json", "convnet6"},
                                           KeysCase{"evalnet_resnet_ap10.keys.json", "resnet_ap10"},
                                           KeysCase{"evalnet_resnet18.keys.json", "resnet18"}),
                         [](const auto& info) { return info.param.net; });

TEST(EvalNets, GreyScaleConvNetFollowsDC) {
  // DC/IDC ConvNet for 1-channel 28 px: first conv pads 3 (28 -> 32), classifier 128*4*4.
  auto net = mdd::make_eval_net("convnet3", 10, 28, "instance", 0, 1);
  auto sd = mdd::state_dict(*mdd::as_eval_net(net));
  EXPECT_EQ(sd.at("layers.conv.0.weight").sizes().vec(), (std::vector<int64_t>{128, 1, 3, 3}));
  EXPECT_EQ(sd.at("classifier.weight").sizes().vec(), (std::vector<int64_t>{10, 2048}));
  EXPECT_EQ(net.forward<torch::Tensor>(torch::randn({2, 1, 28, 28})).sizes().vec(), (std::vector<int64_t>{2, 10}));
  EXPECT_EQ(mdd::as_eval_net(net)->embed(torch::randn({2, 1, 28, 28})).size(1), 2048);
}

TEST(EvalNets, SmallResNetStemsAndNoNorm) {
  auto ap = mdd::make_eval_net("resnet_ap10", 10, 32, "none", 16);
  auto sd = mdd::state_dict(*mdd::as_eval_net(ap));
  EXPECT_EQ(sd.at("layer0.conv1.weight").sizes().vec(), (std::vector<int64_t>{16, 3, 3, 3}));
  EXPECT_TRUE(sd.count("layer0.conv1.bias"));  // conv bias only without normalisation (reference rule)
  EXPECT_FALSE(sd.count("layer0.bn1.weight"));
  EXPECT_EQ(ap.forward<torch::Tensor>(torch::randn({2, 3, 32, 32})).sizes().vec(), (std::vector<int64_t>{2, 10}));
  auto rn = mdd::make_eval_net("resnet18", 5, 32, "batch", 8);
  EXPECT_EQ(rn.forward<torch::Tensor>(torch::randn({2, 3, 32, 32})).sizes().vec(), (std::vector<int64_t>{2, 5}));
}

TEST(EvalNets, GeneratorInitIsDeterministic) {
  auto a = mdd::make_eval_net("convnet3", 10, 32);
  auto b = mdd::make_eval_net("convnet3", 10, 32);
  mdd::as_eval_net(a)->reset_parameters(torch::make_generator<torch::CPUGeneratorImpl>(7));
  mdd::as_eval_net(b)->reset_parameters(torch::make_generator<torch::CPUGeneratorImpl>(7));
  auto x = torch::randn({2, 3, 32, 32});
  EXPECT_TRUE(torch::equal(a.forward<torch::Tensor>(x), b.forward<torch::Tensor>(x)));
}

TEST(EvalNets, ClassifyOfEmbedEqualsForward) {
  // The proxy runs embed once and classifies the embedding; that must be the forward pass exactly.
  for (const auto& [name, norm, width] : {std::tuple<std::string, std::string, int64_t>{"convnet3", "instance", 0},
                                          {"resnet_ap10", "instance", 16}}) {
    auto net = mdd::make_eval_net(name, 10, 32, norm, width);
    auto* impl = mdd::as_eval_net(net);
    impl->reset_parameters(torch::make_generator<torch::CPUGeneratorImpl>(3));
    impl->eval();
    torch::NoGradGuard ng;
    const auto x = torch::randn({3, 3, 32, 32});
    EXPECT_TRUE(torch::equal(impl->classify(impl->embed(x)), net.forward<torch::Tensor>(x))) << name;
    EXPECT_THROW(impl->classify(torch::randn({3, 7})), mdd::Error) << name;
    EXPECT_THROW(impl->classify(torch::randn({7})), mdd::Error) << name;
  }
}

namespace {
// A network written against the interface before classify() existed: it must still compile, and
// using it where classify is needed must say so instead of crashing.
struct OldStyleNet : mdd::EvalNetImpl {
  torch::Tensor forward(torch::Tensor x) override { return embed(x); }
  torch::Tensor embed(torch::Tensor x) override { return x.flatten(1); }
  std::vector<torch::Tensor> features(torch::Tensor x) override { return {x}; }
  void reset_parameters(torch::Generator) override {}
};
}  // namespace

TEST(EvalNets, ClassifyDefaultNamesWhatIsMissing) {
  OldStyleNet net;
  try {
    net.classify(torch::zeros({2, 5}));
    FAIL() << "expected mdd::Error";
  } catch (const mdd::Error& e) {
    EXPECT_NE(std::string(e.what()).find("classify"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("[2, 5]"), std::string::npos) << e.what();
  }
}

TEST(EvalNets, BadOptionsThrow) {
  EXPECT_THROW(mdd::make_eval_net("vgg11", 10, 32), mdd::Error);
  EXPECT_THROW(mdd::make_eval_net("convnet3", 10, 32, "layer"), mdd::Error);
  EXPECT_THROW(mdd::make_eval_net("resnet50", 10, 224), mdd::Error);
  EXPECT_THROW(mdd::make_eval_net("convnet6", 10, 32), mdd::Error);  // 32 px collapses at depth 6
  EXPECT_THROW(mdd::make_eval_net("convnet3", 0, 32), mdd::Error);
  auto net = mdd::make_eval_net("convnet3", 10, 32);
  EXPECT_THROW(net.forward<torch::Tensor>(torch::randn({1, 3, 64, 64})), mdd::Error);
}

struct FusedCase {
  int64_t in_channels, image_size;
  std::string norm;
  bool input_grad;
};
void PrintTo(const FusedCase& c, std::ostream* os) {
  *os << c.in_channels << "ch_" << c.image_size << "px_" << c.norm << (c.input_grad ? "_input_grad" : "");
}

/// max |got - ref| <= 2e-4 * max |ref| + 1e-5: the fused kernels sum in a different order. The
/// absolute term covers conv biases in front of an instance norm, whose exact gradient is 0 and
/// whose float value is summation noise (~1e-6) in both paths.
::testing::AssertionResult CloseToScale(const torch::Tensor& got, const torch::Tensor& ref, const std::string& what) {
  if (!got.defined() || !ref.defined() || got.sizes() != ref.sizes()) {
    return ::testing::AssertionFailure() << what << ": undefined or shape mismatch";
  }
  const double err = (got - ref).abs().max().item<double>();
  const double scale = ref.abs().max().item<double>();
  if (err > 2e-4 * scale + 1e-5) return ::testing::AssertionFailure() << what << ": err " << err << " scale " << scale;
  return ::testing::AssertionSuccess();
}

class FusedConvNet : public ::testing::TestWithParam<FusedCase> {};

TEST_P(FusedConvNet, MatchesModulePathForwardAndGradients) {
  const auto c = GetParam();
  auto make = [&](bool fused) {
    mdd::ConvNet net(mdd::ConvNetOptions(10, 3).in_channels(c.in_channels).image_size(c.image_size).norm(c.norm)
                         .fused(fused));
    net->reset_parameters(torch::make_generator<torch::CPUGeneratorImpl>(3));
    if (c.norm == "instance") {  // non-trivial affine so gamma/beta enter the comparison
      torch::NoGradGuard g;
      auto gen = torch::make_generator<torch::CPUGeneratorImpl>(5);
      for (auto& p : net->named_parameters()) {
        if (p.key().find("norm") != std::string::npos) p.value().uniform_(0.5, 1.5, gen);
      }
    }
    return net;
  };
  auto fused = make(true), plain = make(false);
  torch::manual_seed(11);
  auto x = torch::randn({5, c.in_channels, c.image_size, c.image_size});
  auto probe = torch::randn({5, 10});
  {
    torch::NoGradGuard g;
    EXPECT_TRUE(CloseToScale(fused->forward(x), plain->forward(x), "inference logits"));
  }
  auto run = [&](mdd::ConvNet& net) {
    auto xi = x.clone().requires_grad_(c.input_grad);
    (net->forward(xi) * probe).sum().backward();
    return xi.grad();
  };
  auto gx_f = run(fused), gx_p = run(plain);
  if (c.input_grad) EXPECT_TRUE(CloseToScale(gx_f, gx_p, "input grad"));
  auto pf = fused->named_parameters(), pp = plain->named_parameters();
  ASSERT_EQ(pf.size(), pp.size());
  for (const auto& kv : pp) {
    EXPECT_TRUE(CloseToScale(pf[kv.key()].grad(), kv.value().grad(), kv.key()));
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, FusedConvNet,
                         ::testing::Values(FusedCase{1, 28, "instance", false}, FusedCase{3, 32, "instance", false},
                                           FusedCase{3, 28, "instance", false},  // 7 px map: odd, floor pooling
                                           FusedCase{1, 28, "none", false}, FusedCase{3, 32, "none", false},
                                           FusedCase{1, 28, "instance", true}, FusedCase{3, 28, "none", true}),
                         [](const auto& info) {
                           std::ostringstream os;
                           PrintTo(info.param, &os);
                           return os.str();
                         });

}  // namespace
