// Golden sampling loops, CFG sampling and the training loss on the dit_small fixture network
// (MANIFEST cases diffusion_step and training_loss).
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "diffusion_golden.h"
#include "mdd/diffusion/gaussian_diffusion.h"
#include "mdd/diffusion/sampler.h"
#include "mdd/io/state_dict.h"
#include "mdd/models/dit.h"
#include "mdd/util/error.h"
#include "test_util.h"

using namespace mdd;
using mdd_test::AllCloseRel;

namespace {

constexpr double kRtol = 1e-4;  // MANIFEST diffusion_step / training_loss rtol

// MANIFEST dit_small constructor, eval mode.
DiT load_dit_small() {
  DiT model(DiTOptions(8, 2, 4, 64, 2, 4).num_classes(10));
  load_state_dict(*model, mdd_test::golden("dit_small.weights.safetensors"), /*strict=*/true);
  model->eval();
  return model;
}

StepNoiseFn stored_noise(const torch::Tensor& stack, int* calls) {
  return [stack, calls](int64_t k, const torch::Tensor& x) {
    ++*calls;
    EXPECT_EQ(stack[k].sizes(), x.sizes());
    return stack[k];
  };
}

}  // namespace

TEST(DiffusionDiT, AncestralLoopMatchesGolden) {
  const auto g = mdd_test::golden("diffusion_step.io.safetensors");
  auto model = load_dit_small();
  GaussianDiffusion d(DiffusionOptions().timestep_respacing("50"));
  const auto y = g.at("loop_y");
  const ModelFn fn = [&](const torch::Tensor& x, const torch::Tensor& t) { return model->forward(x, t, y); };
  // Trajectory rows after steps 0, 24, 49 (intermediate) and the final sample.
  const auto& noise = g.at("loop_step_noise");
  torch::NoGradGuard no_grad;
  torch::Tensor img = g.at("loop_init_noise");
  const auto traj = g.at("loop_traj");
  int row = 0;
  for (int64_t k = 0; k < d.num_timesteps(); ++k) {
    const auto t = torch::full({img.size(0)}, d.num_timesteps() - 1 - k, torch::kInt64);
    img = d.p_sample(fn, img, t, noise[k]);
    if (k == 0 || k == 24 || k == 49) {
      EXPECT_TRUE(AllCloseRel(img, traj[row], kRtol, 0.009)) << "trajectory step " << k;
      ++row;
    }
  }
  EXPECT_TRUE(AllCloseRel(img, g.at("loop_final"), kRtol, 0.009));
  // The convenience loop is the same computation.
  int calls = 0;
  const auto final = d.p_sample_loop(fn, g.at("loop_init_noise"), stored_noise(noise, &calls));
  EXPECT_EQ(calls, 50);
  EXPECT_TRUE(AllCloseRel(final, g.at("loop_final"), kRtol, 0.009));
}

TEST(DiffusionDiT, DdimLoopMatchesGolden) {
  const auto g = mdd_test::golden("diffusion_step.io.safetensors");
  auto model = load_dit_small();
  GaussianDiffusion d(DiffusionOptions().timestep_respacing("50"));
  const auto y = g.at("loop_y");
  const ModelFn fn = [&](const torch::Tensor& x, const torch::Tensor& t) { return model->forward(x, t, y); };
  int calls = 0;
  const auto final =
      d.ddim_sample_loop(fn, g.at("loop_init_noise"), stored_noise(g.at("loop_step_noise"), &calls), /*eta=*/0.0);
  EXPECT_EQ(calls, 50);
  EXPECT_TRUE(AllCloseRel(final, g.at("ddim_final"), kRtol, 0.005));
}

TEST(DiffusionDiT, CfgLoopMatchesGoldenViaForwardWithCfgAndSampler) {
  const auto g = mdd_test::golden("diffusion_step.io.safetensors");
  auto model = load_dit_small();
  const double scale = g.at("cfg_scale").item<double>();
  const auto cfg_y = g.at("cfg_y");
  const auto z = g.at("cfg_init_noise");
  const auto& noise = g.at("loop_step_noise");
  // 1) The reference loop itself on the doubled batch with DiT::forward_with_cfg.
  GaussianDiffusion d(DiffusionOptions().timestep_respacing("50"));
  const ModelFn fn = [&](const torch::Tensor& x, const torch::Tensor& t) {
    return model->forward_with_cfg(x, t, cfg_y, scale);
  };
  int calls = 0;
  const auto full = d.p_sample_loop(fn, torch::cat({z, z}), stored_noise(noise, &calls));
  EXPECT_TRUE(AllCloseRel(full, g.at("cfg_loop_final_full"), kRtol, 0.008));
  EXPECT_TRUE(AllCloseRel(full.chunk(2)[0], g.at("cfg_loop_samples"), kRtol, 0.007));

  // 2) The Sampler's own CFG combination over the raw conditional net, kept half only.
  Sampler sampler([&](const torch::Tensor& x, const torch::Tensor& t,
                      const torch::Tensor& y) { return model->forward(x, t, y); },
                  SamplerOptions().null_class(model->null_class()).cfg_scale(scale).latent_shape({4, 8, 8}));
  const auto kept = sampler.sample_from_noise(cfg_y.narrow(0, 0, 1), z, [&](int64_t k, const torch::Tensor&) {
    return noise[k].narrow(0, 0, 1);  // the kept half's per-step noise
  });
  EXPECT_TRUE(AllCloseRel(kept, g.at("cfg_loop_samples"), kRtol, 0.007));
}

TEST(DiffusionDiT, TrainingLossesMatchGolden) {
  const auto g = mdd_test::golden("training_loss.io.safetensors");
  auto model = load_dit_small();
  GaussianDiffusion d;  // create_diffusion("")
  const auto y = g.at("y");
  const ModelFn fn = [&](const torch::Tensor& x, const torch::Tensor& t) { return model->forward(x, t, y); };
  const auto& x0 = g.at("x_start");
  const auto& t = g.at("t");
  const auto& noise = g.at("noise");
  EXPECT_TRUE(AllCloseRel(d.q_sample(x0, t, noise), g.at("x_t"), kRtol, 5e-06));
  model->zero_grad();
  const auto l = d.training_losses(fn, x0, t, noise);
  EXPECT_TRUE(AllCloseRel(l.mse, g.at("mse"), kRtol, 2e-06));
  EXPECT_TRUE(AllCloseRel(l.vb, g.at("vb"), kRtol, 2e-05));
  EXPECT_TRUE(AllCloseRel(l.loss, g.at("loss"), kRtol, 2e-05));
  EXPECT_TRUE(AllCloseRel(l.pred_xstart, g.at("output"), kRtol, 0.002));
  const auto loss_mean = l.loss.mean();
  EXPECT_TRUE(AllCloseRel(loss_mean, g.at("loss_mean"), kRtol, 3e-06));
  loss_mean.backward();
  const std::vector<std::pair<std::string, double>> grads = {
      {"final_layer.linear.bias", 2e-06},        {"final_layer.adaLN_modulation.1.bias", 7e-07},
      {"blocks.1.attn.proj.bias", 6e-08},        {"blocks.0.mlp.fc2.bias", 4e-08},
      {"t_embedder.mlp.2.bias", 2e-07},          {"x_embedder.proj.bias", 6e-07},
      {"y_embedder.embedding_table.weight", 2e-07}};
  const auto params = model->named_parameters(/*recurse=*/true);
  for (const auto& [name, atol] : grads) {
    SCOPED_TRACE(name);
    const auto* p = params.find(name);
    ASSERT_NE(p, nullptr);
    ASSERT_TRUE(p->grad().defined());
    EXPECT_TRUE(AllCloseRel(p->grad(), g.at("grad." + name), kRtol, atol));
  }
}

TEST(DiffusionDiT, SamplerBatchSizeInvarianceWithDiT) {
  auto model = load_dit_small();
  const auto opts = SamplerOptions().null_class(10).latent_shape({4, 8, 8}).timestep_respacing("5").seed(9);
  const auto net = [&](const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& y) {
    return model->forward(x, t, y);
  };
  const auto labels = torch::tensor({0, 1, 2, 3, 4}, torch::kInt64);
  const auto a = Sampler(net, SamplerOptions(opts).batch_size(1)).sample(labels);
  const auto b = Sampler(net, SamplerOptions(opts).batch_size(4)).sample(labels);
  // Same noise streams; the network's matmuls may differ in the last bits with batch size.
  EXPECT_TRUE(mdd_test::AllClose(a, b, 1e-3));
}

// The sampler's guidance is `cfg_combine` (the model's rule) and bf16 autocast only perturbs the
// result within bf16 rounding: same noise streams, close latents.
TEST(DiffusionDiT, SamplerPrecisionAndOneChannelReferenceGuidance) {
  DiT model(DiTOptions(8, 2, 1, 32, 2, 2).num_classes(3));
  model->eval();
  {
    torch::NoGradGuard ng;
    auto g = at::detail::createCPUGenerator(4);
    for (auto& p : model->parameters()) p.add_(torch::randn(p.sizes(), g) * 0.05);
  }
  const auto net = [&](const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& y) {
    return model->forward(x, t, y);
  };
  const auto opts = SamplerOptions().null_class(3).latent_shape({1, 8, 8}).timestep_respacing("5").seed(2).cfg_scale(2.0);
  const auto labels = torch::tensor({0, 1, 2}, torch::kInt64);
  const Sampler ref(net, SamplerOptions(opts).guidance(CfgGuidance::kReference3Channels));
  const auto a = ref.sample(labels);
  // One guided step equals DiT::forward_with_cfg's first half.
  auto x = torch::randn({3, 1, 8, 8});
  auto t = torch::full({3}, 7, torch::kInt64);
  torch::NoGradGuard ng;
  auto via_model = model->forward_with_cfg(torch::cat({x, x}), torch::cat({t, t}),
                                           torch::cat({labels, torch::full({3}, 3, torch::kInt64)}), 2.0)
                       .narrow(0, 0, 3);
  EXPECT_TRUE(torch::equal(ref.guided_model(labels)(x, t), via_model));
  const auto b = Sampler(net, SamplerOptions(opts).guidance(CfgGuidance::kReference3Channels).precision(Precision::kBF16)).sample(labels);
  const double scale = a.abs().max().item<double>();
  EXPECT_GT(mdd_test::max_abs_diff(a, b), 0.0);
  EXPECT_LT(mdd_test::max_abs_diff(a, b), 0.05 * scale);
  EXPECT_EQ(b.scalar_type(), torch::kFloat32);
}
