// CUDA paths against the CPU fp32 path (run by scripts/gpu-check.sh; every test skips with one
// line where there is no CUDA device). Tolerances, relative to the largest |CPU output|:
//   fp32 (TF32 off): 1e-4   — different kernels and summation orders only;
//   TF32 matmuls:    5e-3   — 10-bit mantissa products accumulated in fp32;
//   bf16 autocast:   3e-2   — 8-bit mantissa, the CPU bf16 tolerance of test_dit.
#include <gtest/gtest.h>

#include <fstream>
#include <map>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "mdd/diffusion/gaussian_diffusion.h"
#include "mdd/diffusion/sampler.h"
#include "mdd/io/state_dict.h"
#include "mdd/models/autoencoder_kl.h"
#include "mdd/models/difffit.h"
#include "mdd/models/dit.h"
#include "mdd/util/precision.h"
#include "test_util.h"

namespace {

using mdd_test::golden;

#define MDD_REQUIRE_CUDA() \
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device"

struct Tf32 {
  explicit Tf32(bool on) : prev_(at::globalContext().allowTF32CuBLAS()), prev_dnn_(at::globalContext().allowTF32CuDNN()) {
    at::globalContext().setAllowTF32CuBLAS(on);
    at::globalContext().setAllowTF32CuDNN(on);
  }
  ~Tf32() {
    at::globalContext().setAllowTF32CuBLAS(prev_);
    at::globalContext().setAllowTF32CuDNN(prev_dnn_);
  }
  bool prev_, prev_dnn_;
};

::testing::AssertionResult RelClose(const torch::Tensor& got, const torch::Tensor& want, double rel) {
  const double scale = want.abs().max().item<double>();
  const double err = mdd_test::max_abs_diff(got.cpu(), want);
  if (err <= rel * scale) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "max err " << err << " > " << rel << " x " << scale;
}

nlohmann::json manifest() {
  std::ifstream in(mdd_test::data_path("MANIFEST.json"));
  return nlohmann::json::parse(in);
}

mdd::DiT dit_case(const std::string& name) {
  const auto c = manifest()["cases"][name]["constructor"];
  mdd::DiT m(mdd::DiTOptions(c.at("input_size"), c.at("patch_size"), c.at("in_channels"), c.at("hidden_size"),
                             c.at("depth"), c.at("num_heads"))
                 .mlp_ratio(c.at("mlp_ratio"))
                 .class_dropout_prob(c.at("class_dropout_prob"))
                 .num_classes(c.at("num_classes"))
                 .learn_sigma(c.at("learn_sigma")));
  return m;
}

struct Mode {
  const char* name;
  bool tf32;
  mdd::Precision precision;
  double rel;
};
const Mode kModes[] = {{"fp32", false, mdd::Precision::kFP32, 1e-4},
                       {"tf32", true, mdd::Precision::kFP32, 5e-3},
                       {"bf16", false, mdd::Precision::kBF16, 3e-2}};

TEST(CUDA, DiTForwardMatchesCpuInEveryPrecision) {
  MDD_REQUIRE_CUDA();
  auto model = dit_case("dit_small");
  mdd::load_state_dict(*model, golden("dit_small.weights.safetensors"), true);
  model->eval();
  const auto io = golden("dit_small.io.safetensors");
  torch::NoGradGuard ng;
  const auto cpu = model->forward(io.at("x"), io.at("t"), io.at("y"));
  model->to(torch::kCUDA);
  for (const auto& m : kModes) {
    Tf32 tf(m.tf32);
    mdd::AutocastGuard ac(torch::kCUDA, m.precision);
    auto out = model->forward(io.at("x").cuda(), io.at("t").cuda(), io.at("y").cuda()).to(torch::kFloat32);
    EXPECT_TRUE(RelClose(out, cpu, m.rel)) << m.name;
  }
}

TEST(CUDA, DiffFitGradientsMatchCpuInEveryPrecision) {
  MDD_REQUIRE_CUDA();
  auto model = dit_case("dit_difffit");
  mdd::apply_difffit(model);
  mdd::load_state_dict(*model, golden("dit_difffit.weights.safetensors"), true);
  model->eval();
  const auto io = golden("dit_difffit.io.safetensors");
  auto grads = [&](torch::Device dev, const Mode* m) {
    model->to(dev);
    model->zero_grad();
    torch::Tensor out;
    {
      Tf32 tf(m && m->tf32);
      mdd::AutocastGuard ac(dev, m ? m->precision : mdd::Precision::kFP32);
      out = model->forward(io.at("x").to(dev), io.at("t").to(dev), io.at("y").to(dev)).to(torch::kFloat32);
    }
    out.pow(2).mean().backward();
    std::map<std::string, torch::Tensor> g;
    for (auto& kv : model->named_parameters())
      if (kv.value().grad().defined()) g[kv.key()] = kv.value().grad().cpu().clone();
    return g;
  };
  const auto cpu = grads(torch::kCPU, nullptr);
  ASSERT_FALSE(cpu.empty());
  for (const auto& m : kModes) {
    const auto gpu = grads(torch::kCUDA, &m);
    for (const auto& kv : cpu) EXPECT_TRUE(RelClose(gpu.at(kv.first), kv.second, m.rel * 3)) << m.name << " " << kv.first;
  }
}

TEST(CUDA, VaeDecodeMatchesCpu) {
  MDD_REQUIRE_CUDA();
  std::ifstream in(mdd_test::data_path("MANIFEST_vae_eval.json"));
  const auto cfg = nlohmann::json::parse(in)["cases"]["vae_tiny"]["config"];
  mdd::AutoencoderKL vae(mdd::AutoencoderKLOptions()
                             .in_channels(cfg["in_channels"].get<int64_t>())
                             .out_channels(cfg["out_channels"].get<int64_t>())
                             .latent_channels(cfg["latent_channels"].get<int64_t>())
                             .block_out_channels(cfg["block_out_channels"].get<std::vector<int64_t>>())
                             .layers_per_block(cfg["layers_per_block"].get<int64_t>())
                             .norm_num_groups(cfg["norm_num_groups"].get<int64_t>()));
  mdd::load_state_dict(*vae, golden("vae_tiny.weights.safetensors"), true);
  vae->eval();
  const auto io = golden("vae_tiny.io.safetensors");
  torch::NoGradGuard ng;
  const auto cpu = vae->decode(io.at("z_in"));
  for (auto [dtype, rel] : {std::pair<torch::Dtype, double>{torch::kFloat32, 1e-4}, {torch::kBFloat16, 3e-2}}) {
    vae->runtime.dtype(dtype);
    vae->place(torch::kCUDA);
    EXPECT_TRUE(RelClose(vae->decode(io.at("z_in").cuda()), cpu, rel)) << c10::toString(dtype);
  }
}

TEST(CUDA, SamplerIsDeterministicOnTheGpu) {
  MDD_REQUIRE_CUDA();
  auto model = dit_case("dit_small");
  mdd::load_state_dict(*model, golden("dit_small.weights.safetensors"), true);
  model->eval();
  model->to(torch::kCUDA);
  const auto net = [&](const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& y) { return model->forward(x, t, y); };
  const auto opts = mdd::SamplerOptions().null_class(10).latent_shape({4, 8, 8}).timestep_respacing("5").seed(9).device(torch::kCUDA);
  const auto labels = torch::tensor({0, 1, 2, 3, 4}, torch::kInt64);
  const auto a = mdd::Sampler(net, mdd::SamplerOptions(opts).batch_size(4)).sample(labels);
  const auto b = mdd::Sampler(net, mdd::SamplerOptions(opts).batch_size(4)).sample(labels);
  EXPECT_TRUE(torch::equal(a, b));  // same seed, same batching: bit-identical
  const auto c = mdd::Sampler(net, mdd::SamplerOptions(opts).batch_size(1)).sample(labels);
  EXPECT_TRUE(mdd_test::AllClose(a.cpu(), c.cpu(), 1e-3));  // other batching: same noise streams
  // And the same latents as the CPU sampler within the fp32 tolerance (noise is drawn on the CPU).
  model->to(torch::kCPU);
  const auto d = mdd::Sampler(net, mdd::SamplerOptions(opts).batch_size(4).device(torch::kCPU)).sample(labels);
  EXPECT_TRUE(mdd_test::AllClose(a.cpu(), d, 1e-3));
}

}  // namespace
