// Diffusion schedule, steps, losses and the sampler, without a DiT (see test_diffusion_dit.cpp for
// the golden loops and training loss that need the dit_small network).
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "diffusion_golden.h"
#include "mdd/diffusion/gaussian_diffusion.h"
#include "mdd/diffusion/sampler.h"
#include "mdd/diffusion/schedule.h"
#include "mdd/util/error.h"
#include "test_util.h"

using namespace mdd;
using mdd_test::AllCloseRel;

namespace {

// MANIFEST diffusion_schedule tolerance.
constexpr double kSchedAtol = 1e-12;
constexpr double kSchedRtol = 1e-10;
// MANIFEST diffusion_step / training_loss rtol (atol is per tensor: suggested_atol).
constexpr double kStepRtol = 1e-4;

bool equal_i64(const torch::Tensor& a, const torch::Tensor& b) {
  return a.sizes() == b.sizes() && a.to(torch::kInt64).equal(b.to(torch::kInt64));
}

}  // namespace

// ------------------------------------------------------------------------------------------ schedule

TEST(DiffusionSchedule, GoldenBuffersAndTimestepMaps) {
  const auto g = mdd_test::golden("diffusion_schedule.io.safetensors");
  for (const std::string resp : {"", "250", "50"}) {
    const std::string key = resp.empty() ? "d1000" : "d" + resp;
    SCOPED_TRACE(key);
    GaussianDiffusion d(DiffusionOptions().timestep_respacing(resp));
    EXPECT_EQ(d.num_timesteps(), g.at(key + ".betas").size(0));
    EXPECT_EQ(d.betas().scalar_type(), torch::kFloat64);
    EXPECT_TRUE(AllCloseRel(d.betas(), g.at(key + ".betas"), kSchedRtol, kSchedAtol));
    EXPECT_TRUE(AllCloseRel(d.alphas_cumprod(), g.at(key + ".alphas_cumprod"), kSchedRtol, kSchedAtol));
    EXPECT_TRUE(AllCloseRel(d.posterior_variance(), g.at(key + ".posterior_variance"), kSchedRtol, kSchedAtol));
    EXPECT_TRUE(AllCloseRel(d.posterior_log_variance_clipped(), g.at(key + ".posterior_log_variance_clipped"),
                            kSchedRtol, kSchedAtol));
    EXPECT_TRUE(AllCloseRel(d.posterior_mean_coef1(), g.at(key + ".posterior_mean_coef1"), kSchedRtol, kSchedAtol));
    EXPECT_TRUE(AllCloseRel(d.posterior_mean_coef2(), g.at(key + ".posterior_mean_coef2"), kSchedRtol, kSchedAtol));
    // The named accessors are rows of the one coefficient table; the other rows follow from them.
    using C = GaussianDiffusion::Coef;
    EXPECT_TRUE(torch::equal(d.coefficient(C::kBetas), d.betas()));
    EXPECT_TRUE(torch::equal(d.coefficient(C::kPosteriorMeanCoef2), d.posterior_mean_coef2()));
    EXPECT_TRUE(torch::allclose(d.coefficient(C::kSqrtOneMinusAlphasCumprod), torch::sqrt(1.0 - d.alphas_cumprod())));
    EXPECT_TRUE(torch::allclose(d.coefficient(C::kLogBetas), torch::log(d.betas())));
    EXPECT_EQ(d.coefficient(C::kFixedLarge)[0].item<double>(), d.posterior_variance()[1].item<double>());
    EXPECT_THROW(d.coefficient(C::kCount), mdd::Error);
    if (resp.empty()) {
      EXPECT_TRUE(equal_i64(d.timestep_map(), torch::arange(1000, torch::kInt64)));  // identity (not stored)
    } else {
      EXPECT_TRUE(equal_i64(d.timestep_map(), g.at(key + ".timestep_map")));
    }
  }
}

TEST(DiffusionSchedule, SpaceTimestepsMatchesGoldenMaps) {
  const auto g = mdd_test::golden("diffusion_schedule.io.safetensors");
  EXPECT_TRUE(equal_i64(torch::tensor(space_timesteps(1000, "50")), g.at("d50.timestep_map")));
  EXPECT_TRUE(equal_i64(torch::tensor(space_timesteps(1000, "250")), g.at("d250.timestep_map")));
  EXPECT_TRUE(equal_i64(torch::tensor(space_timesteps(1000, "")), torch::arange(1000, torch::kInt64)));
  // Blank-padded numbers are accepted like Python int().
  EXPECT_TRUE(equal_i64(torch::tensor(space_timesteps(1000, " 50 ")), g.at("d50.timestep_map")));
}

TEST(DiffusionSchedule, SpaceTimestepsSectionsAndDdim) {
  // "10,15,20" over 1000 steps: sections [0,334), [334,667), [667,1000); each section's first and
  // last step are taken (stride (size-1)/(n-1) reaches the end exactly).
  const auto s = space_timesteps(1000, "10,15,20");
  ASSERT_EQ(s.size(), 45u);
  EXPECT_EQ(s.front(), 0);
  EXPECT_EQ(s[9], 333);
  EXPECT_EQ(s[10], 334);
  EXPECT_EQ(s[24], 666);
  EXPECT_EQ(s[25], 667);
  EXPECT_EQ(s.back(), 999);
  for (size_t i = 1; i < s.size(); ++i) EXPECT_LT(s[i - 1], s[i]);
  // ddimN: range(0, T, stride) for the first stride giving N steps.
  const auto dd = space_timesteps(1000, "ddim50");
  ASSERT_EQ(dd.size(), 50u);
  for (size_t i = 0; i < dd.size(); ++i) EXPECT_EQ(dd[i], static_cast<int64_t>(20 * i));
  const auto d7 = space_timesteps(1000, "ddim7");  // ceil(1000/143) == 7
  ASSERT_EQ(d7.size(), 7u);
  EXPECT_EQ(d7[1], 143);
  // A respaced diffusion over sections feeds the mapped (original) timesteps to the model.
  GaussianDiffusion d(DiffusionOptions().timestep_respacing("10,15,20"));
  EXPECT_EQ(d.num_timesteps(), 45);
  EXPECT_TRUE(equal_i64(d.timestep_map(), torch::tensor(s)));
}

TEST(DiffusionSchedule, ImpossibleRequestsThrow) {
  EXPECT_THROW(space_timesteps(1000, "fifty"), Error);
  EXPECT_THROW(space_timesteps(1000, "10,,5"), Error);
  EXPECT_THROW(space_timesteps(1000, "2000"), Error);       // more steps than the section has
  EXPECT_THROW(space_timesteps(1000, "600,600"), Error);    // 500-step sections
  EXPECT_THROW(space_timesteps(1000, "ddim999"), Error);    // no integer stride
  EXPECT_THROW(space_timesteps(1000, "ddimx"), Error);
  EXPECT_THROW(space_timesteps(1000, "-5"), Error);
  EXPECT_THROW(space_timesteps(1000, "0"), Error);          // keeps nothing
  EXPECT_THROW(space_timesteps(0, ""), Error);
  EXPECT_THROW(get_named_beta_schedule("quadratic", 1000), Error);
  EXPECT_THROW(GaussianDiffusion(DiffusionOptions().timestep_respacing("abc")), Error);
  EXPECT_THROW(GaussianDiffusion(DiffusionOptions().timestep_respacing("1")), Error);  // a single step
}

TEST(DiffusionSchedule, CosineScheduleIsMonotoneAndCapped) {
  const auto b = get_named_beta_schedule("squaredcos_cap_v2", 1000);
  ASSERT_EQ(b.size(), 1000u);
  for (size_t i = 1; i < b.size(); ++i) EXPECT_GE(b[i], b[i - 1]);
  EXPECT_LE(b.back(), 0.999);
  EXPECT_GT(b.front(), 0.0);
  GaussianDiffusion d(DiffusionOptions().noise_schedule("squaredcos_cap_v2").timestep_respacing("50"));
  EXPECT_EQ(d.num_timesteps(), 50);
}

// ------------------------------------------------------------------------------------------ steps

namespace {

// A ModelFn replaying the stored DiT output; asserts it is called with the ORIGINAL timesteps.
ModelFn replay_model(const torch::Tensor& expected_t, const torch::Tensor& out, int* calls) {
  return [expected_t, out, calls](const torch::Tensor& x, const torch::Tensor& t) {
    ++*calls;
    EXPECT_TRUE(equal_i64(t, expected_t)) << "model got t=" << t << " expected " << expected_t;
    EXPECT_EQ(x.sizes()[0], out.sizes()[0]);
    return out;
  };
}

}  // namespace

TEST(DiffusionStep, PMeanVarianceAndPSampleMatchGolden) {
  const auto g = mdd_test::golden("diffusion_step.io.safetensors");
  GaussianDiffusion d(DiffusionOptions().timestep_respacing("50"));
  ASSERT_TRUE(equal_i64(d.timestep_map(), g.at("timestep_map")));
  int calls = 0;
  const auto model = replay_model(g.at("model_t"), g.at("model_out"), &calls);
  const auto& x = g.at("x_t");
  const auto& t = g.at("t");

  const auto mv = d.p_mean_variance(model, x, t, /*clip_denoised=*/false);
  EXPECT_TRUE(AllCloseRel(mv.mean, g.at("pmv_mean"), kStepRtol, 7e-06));
  EXPECT_TRUE(AllCloseRel(mv.variance, g.at("pmv_variance"), kStepRtol, 2e-06));
  EXPECT_TRUE(AllCloseRel(mv.log_variance, g.at("pmv_log_variance"), kStepRtol, 3e-05));
  EXPECT_TRUE(AllCloseRel(mv.pred_xstart, g.at("pmv_pred_xstart"), kStepRtol, 0.002));
  EXPECT_EQ(mv.mean.scalar_type(), torch::kFloat32);

  const auto s = d.p_sample(model, x, t, g.at("psample_noise"), false);
  EXPECT_TRUE(AllCloseRel(s, g.at("psample_sample"), kStepRtol, 7e-06));

  const auto cmv = d.p_mean_variance(model, x, t, /*clip_denoised=*/true);
  EXPECT_TRUE(AllCloseRel(cmv.mean, g.at("clip_pmv_mean"), kStepRtol, 3e-06));
  EXPECT_TRUE(AllCloseRel(cmv.variance, g.at("clip_pmv_variance"), kStepRtol, 2e-06));
  EXPECT_TRUE(AllCloseRel(cmv.log_variance, g.at("clip_pmv_log_variance"), kStepRtol, 3e-05));
  EXPECT_TRUE(AllCloseRel(cmv.pred_xstart, g.at("clip_pmv_pred_xstart"), kStepRtol, 0.0003));
  const auto cs = d.p_sample(model, x, t, g.at("psample_noise"), true);
  EXPECT_TRUE(AllCloseRel(cs, g.at("clip_psample_sample"), kStepRtol, 4e-06));
  EXPECT_EQ(calls, 4);
}

TEST(DiffusionStep, NoiseIsMaskedAtTZero) {
  GaussianDiffusion d(DiffusionOptions().timestep_respacing("50"));
  const auto x = torch::randn({2, 4, 4, 4});
  const auto out = torch::randn({2, 8, 4, 4});
  const ModelFn model = [&](const torch::Tensor&, const torch::Tensor&) { return out; };
  const auto t = torch::tensor({0, 0}, torch::kInt64);
  const auto a = d.p_sample(model, x, t, torch::randn_like(x));
  const auto b = d.p_sample(model, x, t, torch::randn_like(x) * 100);
  EXPECT_TRUE(a.equal(b));
  EXPECT_TRUE(a.equal(d.p_mean_variance(model, x, t).mean));
  const auto c = d.ddim_sample(model, x, t, torch::randn_like(x), 1.0);
  const auto e = d.ddim_sample(model, x, t, torch::randn_like(x), 1.0);
  EXPECT_TRUE(c.equal(e));
}

TEST(DiffusionStep, DdimEtaZeroIgnoresNoiseAndInvertsQSample) {
  // With the true eps, a DDIM step from x_t lands on q's mean path: x_{t-1} = sqrt(abar_prev) x0 +
  // sqrt(1 - abar_prev) eps. Checks the step algebra independently of the golden loop.
  GaussianDiffusion d(DiffusionOptions().timestep_respacing("50").learn_sigma(false));
  torch::manual_seed(3);
  const auto x0 = torch::randn({3, 2, 4, 4}) * 0.5;
  const auto eps = torch::randn({3, 2, 4, 4});
  const auto t = torch::tensor({10, 30, 49}, torch::kInt64);
  const auto x_t = d.q_sample(x0, t, eps);
  const ModelFn model = [&](const torch::Tensor&, const torch::Tensor&) { return eps; };
  const auto a = d.ddim_sample(model, x_t, t, torch::randn_like(x0), 0.0);
  const auto b = d.ddim_sample(model, x_t, t, torch::randn_like(x0), 0.0);
  EXPECT_TRUE(a.equal(b));
  const auto acp = d.alphas_cumprod_prev().index_select(0, t).to(torch::kFloat32).view({3, 1, 1, 1});
  const auto expect = torch::sqrt(acp) * x0 + torch::sqrt(1 - acp) * eps;
  EXPECT_TRUE(mdd_test::AllClose(a, expect, 1e-4));
}

TEST(DiffusionStep, FixedVarianceWhenSigmaIsNotLearned) {
  for (bool small : {false, true}) {
    GaussianDiffusion d(DiffusionOptions().timestep_respacing("50").learn_sigma(false).sigma_small(small));
    const auto x = torch::randn({2, 3, 4, 4});
    const auto eps = torch::randn({2, 3, 4, 4});
    const ModelFn model = [&](const torch::Tensor&, const torch::Tensor&) { return eps; };
    const auto t = torch::tensor({0, 17}, torch::kInt64);
    const auto mv = d.p_mean_variance(model, x, t);
    const auto pv = d.posterior_variance();
    // FIXED_LARGE: [posterior_variance[1], betas[1:]]; FIXED_SMALL: posterior variance (clipped log).
    const double v0 = small ? pv[0].item<double>() : pv[1].item<double>();
    const double v17 = small ? pv[17].item<double>() : d.betas()[17].item<double>();
    EXPECT_FLOAT_EQ(mv.variance[0][0][0][0].item<float>(), static_cast<float>(v0));
    EXPECT_FLOAT_EQ(mv.variance[1][2][3][3].item<float>(), static_cast<float>(v17));
    EXPECT_FLOAT_EQ(mv.log_variance[1][0][0][0].item<float>(), static_cast<float>(std::log(v17)));
    // The loss is the plain eps MSE; vb is zero.
    const auto x0 = torch::randn({2, 3, 4, 4});
    const auto noise = torch::randn({2, 3, 4, 4});
    const auto l = d.training_losses(model, x0, t, noise);
    EXPECT_TRUE(l.vb.equal(torch::zeros({2})));
    EXPECT_TRUE(mdd_test::AllClose(l.mse, (noise - eps).pow(2).mean({1, 2, 3}), 1e-7));
    EXPECT_TRUE(l.loss.equal(l.mse));
  }
}

TEST(DiffusionStep, TrainingLossPredXstartCarriesGradThroughEpsOnly) {
  GaussianDiffusion d;  // 1000 steps, learned sigma
  torch::manual_seed(11);
  auto w = torch::randn({8, 4, 1, 1}, torch::requires_grad());
  const ModelFn model = [&](const torch::Tensor& x, const torch::Tensor&) {
    return torch::nn::functional::conv2d(x, w) * 0.1;
  };
  const auto x0 = torch::randn({2, 4, 4, 4});
  const auto noise = torch::randn({2, 4, 4, 4});
  const auto t = torch::tensor({0, 500}, torch::kInt64);
  const auto l = d.training_losses(model, x0, t, noise);
  ASSERT_TRUE(l.pred_xstart.requires_grad());
  const auto g = torch::autograd::grad({l.pred_xstart.sum()}, {w}, {}, /*retain_graph=*/true)[0];
  // pred_xstart depends only on eps = output channels 0..3, i.e. rows 0..3 of w.
  EXPECT_GT(g.narrow(0, 0, 4).abs().sum().item<double>(), 0.0);
  EXPECT_EQ(g.narrow(0, 4, 4).abs().sum().item<double>(), 0.0);
  // vb only reaches the variance channels (frozen mean).
  const auto gv = torch::autograd::grad({l.vb.sum()}, {w})[0];
  EXPECT_EQ(gv.narrow(0, 0, 4).abs().sum().item<double>(), 0.0);
  EXPECT_GT(gv.narrow(0, 4, 4).abs().sum().item<double>(), 0.0);
  EXPECT_TRUE(l.loss.allclose(l.mse + l.vb));
}

TEST(DiffusionStep, BadInputThrows) {
  GaussianDiffusion d(DiffusionOptions().timestep_respacing("50"));
  const auto x = torch::randn({2, 4, 4, 4});
  const auto good_out = torch::randn({2, 8, 4, 4});
  const ModelFn model = [&](const torch::Tensor&, const torch::Tensor&) { return good_out; };
  const auto noise = torch::randn_like(x);
  EXPECT_THROW(d.p_sample(model, x, torch::tensor({0, 50}, torch::kInt64), noise), Error);   // t out of range
  EXPECT_THROW(d.p_sample(model, x, torch::tensor({-1, 3}, torch::kInt64), noise), Error);
  EXPECT_THROW(d.p_sample(model, x, torch::tensor({3}, torch::kInt64), noise), Error);       // t batch
  EXPECT_THROW(d.p_sample(model, x, torch::tensor({1.0, 2.0}), noise), Error);               // float t
  EXPECT_THROW(d.p_sample(model, x, torch::tensor({1, 2}, torch::kInt64), torch::randn({2, 4, 4})), Error);
  const ModelFn bad = [&](const torch::Tensor&, const torch::Tensor&) { return torch::randn({2, 4, 4, 4}); };
  EXPECT_THROW(d.p_mean_variance(bad, x, torch::tensor({1, 2}, torch::kInt64)), Error);      // no variance channels
  EXPECT_THROW(d.p_mean_variance(ModelFn{}, x, torch::tensor({1, 2}, torch::kInt64)), Error);
  EXPECT_THROW(d.q_sample(x, torch::tensor({1, 1000}, torch::kInt64), noise), Error);
  EXPECT_THROW(d.ddim_sample(model, x, torch::tensor({1, 2}, torch::kInt64), noise, -1.0), Error);
  GaussianDiffusion full;
  EXPECT_THROW(full.training_losses(model, x, torch::tensor({1, 1000}, torch::kInt64), noise), Error);
  EXPECT_NO_THROW(full.training_losses(model, x, torch::tensor({1, 999}, torch::kInt64), noise));
}

TEST(DiffusionStep, LoopReportsProgressAndCallsModelWithMappedTimesteps) {
  GaussianDiffusion d(DiffusionOptions().timestep_respacing("10"));
  const auto map = d.timestep_map();
  std::vector<int64_t> seen;
  const ModelFn model = [&](const torch::Tensor& x, const torch::Tensor& t) {
    seen.push_back(t[0].item<int64_t>());
    return torch::zeros({x.size(0), 2 * x.size(1), x.size(2), x.size(3)});
  };
  std::vector<int64_t> steps;
  const auto noise = torch::randn({1, 2, 2, 2});
  d.p_sample_loop(model, noise, [](int64_t, const torch::Tensor& x) { return torch::zeros_like(x); }, false,
                  [&](const Progress& p) {
                    EXPECT_EQ(p.stage, "sample");
                    EXPECT_EQ(p.total, 10);
                    steps.push_back(p.step);
                  });
  ASSERT_EQ(seen.size(), 10u);
  for (int64_t k = 0; k < 10; ++k) {
    EXPECT_EQ(seen[k], map[9 - k].item<int64_t>());
    EXPECT_EQ(steps[k], k + 1);
  }
}

// ------------------------------------------------------------------------------------------ sampler

namespace {

// A tiny deterministic "class-conditional net" that acts on each row independently, so its output
// for an image never depends on the batch it is in.
torch::Tensor tiny_net(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& y) {
  const auto tf = t.to(torch::kFloat32).view({-1, 1, 1, 1});
  const auto yf = y.to(torch::kFloat32).view({-1, 1, 1, 1});
  const auto eps = torch::tanh(x * 0.7 + yf * 0.05) * 0.9 + 0.001 * tf / 1000.0;
  const auto v = torch::tanh(x * 0.3 - yf * 0.1 + tf / 2000.0);
  return torch::cat({eps, v}, 1);
}

SamplerOptions tiny_options() {
  return SamplerOptions().timestep_respacing("8").null_class(10).latent_shape({4, 4, 4}).seed(1234);
}

}  // namespace

TEST(Sampler, SameSeedSameLatentsWhateverTheBatchSize) {
  const auto labels = torch::tensor({0, 3, 9, 1, 2, 2, 5, 7, 8, 0, 1, 4, 6, 9, 3, 3, 10}, torch::kInt64);
  std::vector<torch::Tensor> results;
  for (int64_t bs : {1, 4, 16}) {
    Sampler s(tiny_net, tiny_options().batch_size(bs));
    results.push_back(s.sample(labels));
  }
  ASSERT_EQ(results[0].sizes(), (std::vector<int64_t>{17, 4, 4, 4}));
  EXPECT_TRUE(results[0].equal(results[1]));
  EXPECT_TRUE(results[0].equal(results[2]));
  EXPECT_TRUE(torch::isfinite(results[0]).all().item<bool>());
  // Another seed gives other latents; explicit ids select the same per-image streams.
  Sampler other(tiny_net, tiny_options().seed(1235));
  EXPECT_FALSE(other.sample(labels).equal(results[0]));
  Sampler s4(tiny_net, tiny_options().batch_size(4));
  const auto part = s4.sample(labels.narrow(0, 5, 6), torch::arange(5, 11, torch::kInt64));
  EXPECT_TRUE(part.equal(results[0].narrow(0, 5, 6)));
  // DDIM too.
  const auto dd1 = Sampler(tiny_net, tiny_options().batch_size(1).method(SamplingMethod::kDDIM).eta(0.5)).sample(labels);
  const auto dd16 =
      Sampler(tiny_net, tiny_options().batch_size(16).method(SamplingMethod::kDDIM).eta(0.5)).sample(labels);
  EXPECT_TRUE(dd1.equal(dd16));
}

TEST(Sampler, CfgMatchesReferenceForwardWithCfgLoop) {
  // The reference sample.py: x = [z, z], y = [y, null], model = forward_with_cfg (guidance on eps
  // channels 0..2 of the first half, reused for both halves), full p_sample_loop on the doubled
  // batch, keep the first half. The Sampler runs only the kept half.
  const double scale = 4.0;
  const int64_t null_class = 10;
  const auto forward_with_cfg = [&](const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& y) {
    const int64_t h = x.size(0) / 2;
    const auto half = x.narrow(0, 0, h);
    const auto out = tiny_net(torch::cat({half, half}), t, y);
    const auto eps = out.narrow(1, 0, 3), rest = out.narrow(1, 3, out.size(1) - 3);
    const auto cond_eps = eps.narrow(0, 0, h), uncond_eps = eps.narrow(0, h, h);
    const auto half_eps = uncond_eps + scale * (cond_eps - uncond_eps);
    return torch::cat({torch::cat({half_eps, half_eps}), rest}, 1);
  };
  torch::manual_seed(77);
  const auto y = torch::tensor({3, 7}, torch::kInt64);
  const auto z = torch::randn({2, 4, 4, 4});
  const auto step_noise = torch::randn({8, 4, 4, 4, 4});  // [S, 2B, C, H, W]
  GaussianDiffusion d(DiffusionOptions().timestep_respacing("8"));
  const auto y2 = torch::cat({y, torch::full({2}, null_class, torch::kInt64)});
  const auto ref = d.p_sample_loop([&](const torch::Tensor& x, const torch::Tensor& t) { return forward_with_cfg(x, t, y2); },
                                   torch::cat({z, z}),
                                   [&](int64_t k, const torch::Tensor&) { return step_noise[k]; });
  Sampler s(tiny_net, tiny_options().cfg_scale(scale).null_class(null_class));
  const auto got =
      s.sample_from_noise(y, z, [&](int64_t k, const torch::Tensor&) { return step_noise[k].narrow(0, 0, 2); });
  EXPECT_TRUE(mdd_test::AllClose(got, ref.narrow(0, 0, 2), 1e-6));

  // kAllEpsChannels guides channel 3 too, so the result differs.
  Sampler all(tiny_net, tiny_options().cfg_scale(scale).null_class(null_class).guidance(CfgGuidance::kAllEpsChannels));
  const auto got_all =
      all.sample_from_noise(y, z, [&](int64_t k, const torch::Tensor&) { return step_noise[k].narrow(0, 0, 2); });
  EXPECT_TRUE(got_all.narrow(1, 0, 3).isfinite().all().item<bool>());
  EXPECT_FALSE(got_all.equal(got));
  // Scale 1 is the plain conditional model.
  Sampler one(tiny_net, tiny_options().cfg_scale(1.0));
  const auto cond = d.p_sample_loop([&](const torch::Tensor& x, const torch::Tensor& t) { return tiny_net(x, t, y); }, z,
                                    [&](int64_t k, const torch::Tensor&) { return step_noise[k].narrow(0, 0, 2); });
  EXPECT_TRUE(one.sample_from_noise(y, z, [&](int64_t k, const torch::Tensor&) {
                     return step_noise[k].narrow(0, 0, 2);
                   }).equal(cond));
}

TEST(Sampler, GuidanceIntervalGuidesOnlyItsSteps) {
  // Reference: CFG (3-channel rule) at the steps whose model timestep lies in [200, 700], the
  // conditional output alone elsewhere.
  const double scale = 3.0;
  const int64_t null_class = 10;
  torch::manual_seed(78);
  const auto y = torch::tensor({3, 7, 0}, torch::kInt64);
  const auto z = torch::randn({3, 4, 4, 4});
  const auto step_noise = torch::randn({8, 3, 4, 4, 4});
  const StepNoiseFn noise = [&](int64_t k, const torch::Tensor&) { return step_noise[k]; };
  GaussianDiffusion d(DiffusionOptions().timestep_respacing("8"));
  int64_t guided_steps = 0;
  const auto ref = d.p_sample_loop(
      [&](const torch::Tensor& x, const torch::Tensor& t) {
        const int64_t tt = t[0].item<int64_t>();
        if (tt < 200 || tt > 700) return tiny_net(x, t, y);
        ++guided_steps;
        const auto out = tiny_net(torch::cat({x, x}), torch::cat({t, t}),
                                  torch::cat({y, torch::full_like(y, null_class)}));
        return cfg_combine(out, scale, 3);
      },
      z, noise);
  ASSERT_GT(guided_steps, 0);
  ASSERT_LT(guided_steps, 8);  // the interval splits the 8 steps
  int64_t calls_2n = 0, calls_n = 0;
  const ConditionalModelFn counting = [&](const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& yy) {
    (x.size(0) == 2 * y.size(0) ? calls_2n : calls_n)++;
    return tiny_net(x, t, yy);
  };
  const auto o = tiny_options().cfg_scale(scale).null_class(null_class);
  const auto got = Sampler(counting, SamplerOptions(o).cfg_interval({200, 700})).sample_from_noise(y, z, noise);
  EXPECT_TRUE(mdd_test::AllClose(got, ref, 1e-6));
  EXPECT_EQ(calls_2n, guided_steps);  // the unconditional half is skipped outside the interval
  EXPECT_EQ(calls_n, 8 - guided_steps);
  // An interval over every timestep is plain CFG; one over none is the conditional model.
  const auto full = Sampler(tiny_net, o).sample_from_noise(y, z, noise);
  EXPECT_TRUE(Sampler(tiny_net, SamplerOptions(o).cfg_interval({0, 999})).sample_from_noise(y, z, noise).equal(full));
  EXPECT_FALSE(got.equal(full));
  const auto cond = Sampler(tiny_net, SamplerOptions(o).cfg_scale(1.0)).sample_from_noise(y, z, noise);
  EXPECT_TRUE(Sampler(tiny_net, SamplerOptions(o).cfg_interval({1000, 2000})).sample_from_noise(y, z, noise).equal(cond));
  // Malformed intervals are refused up front.
  EXPECT_THROW(Sampler(tiny_net, SamplerOptions(o).cfg_interval({5})), Error);
  EXPECT_THROW(Sampler(tiny_net, SamplerOptions(o).cfg_interval({700, 200})), Error);
  EXPECT_THROW(Sampler(tiny_net, SamplerOptions(o).cfg_interval({-1, 200})), Error);
  EXPECT_THROW(Sampler(tiny_net, SamplerOptions(o).cfg_interval({0, 200, 400})), Error);
}

TEST(Sampler, ProgressCoversEveryStepOfEveryBatch) {
  Sampler s(tiny_net, tiny_options().batch_size(3));
  std::vector<Progress> events;
  s.sample(torch::tensor({1, 2, 3, 4, 5}, torch::kInt64), [&](const Progress& p) { events.push_back(p); });
  ASSERT_EQ(events.size(), 16u);  // 2 batches x 8 steps
  for (size_t i = 0; i < events.size(); ++i) {
    EXPECT_EQ(events[i].stage, "sample");
    EXPECT_EQ(events[i].step, static_cast<int64_t>(i + 1));
    EXPECT_EQ(events[i].total, 16);
  }
}

TEST(Sampler, OptionsNestTheDiffusionOptions) {
  EXPECT_EQ(SamplerOptions().diffusion().timestep_respacing(), "50");
  EXPECT_EQ(SamplerOptions().diffusion().num_timesteps(), 1000);
  // The older flat names are aliases of the nested fields.
  const auto o = SamplerOptions().timestep_respacing("8").diffusion_steps(500).noise_schedule("squaredcos_cap_v2").learn_sigma(false);
  EXPECT_EQ(o.diffusion().timestep_respacing(), "8");
  EXPECT_EQ(o.diffusion().num_timesteps(), 500);
  EXPECT_EQ(o.diffusion().noise_schedule(), "squaredcos_cap_v2");
  EXPECT_FALSE(o.diffusion().learn_sigma());
  EXPECT_EQ(o.timestep_respacing(), "8");
  EXPECT_EQ(o.diffusion_steps(), 500);
  EXPECT_EQ(parse_sampling_method(sampling_method_name(SamplingMethod::kDDIM)), SamplingMethod::kDDIM);
  EXPECT_EQ(parse_sampling_method("ddpm"), SamplingMethod::kDDPM);
  EXPECT_THROW(parse_sampling_method("euler"), Error);
}

TEST(Sampler, BadInputThrows) {
  EXPECT_THROW(Sampler(tiny_net, tiny_options().timestep_respacing("fifty")), Error);
  EXPECT_THROW(Sampler(tiny_net, tiny_options().batch_size(0)), Error);
  EXPECT_THROW(Sampler(tiny_net, tiny_options().latent_shape({4, 4})), Error);
  EXPECT_THROW(Sampler(ConditionalModelFn{}, tiny_options()), Error);
  Sampler s(tiny_net, tiny_options());
  EXPECT_THROW(s.sample(torch::zeros({2, 2}, torch::kInt64)), Error);                  // labels not 1-D
  EXPECT_THROW(s.sample(torch::tensor({1.0, 2.0})), Error);                            // float labels
  EXPECT_THROW(s.sample(torch::tensor({1, 11}, torch::kInt64)), Error);                // beyond null class
  EXPECT_THROW(s.sample(torch::tensor({-1}, torch::kInt64)), Error);
  EXPECT_THROW(s.sample(torch::tensor({1, 2}, torch::kInt64), torch::arange(3)), Error);  // ids mismatch
  const auto noise_fn = [](int64_t, const torch::Tensor& x) { return torch::zeros_like(x); };
  EXPECT_THROW(s.sample_from_noise(torch::tensor({1, 2, 3}, torch::kInt64), torch::randn({2, 4, 4, 4}), noise_fn),
               Error);                                                                  // labels vs batch
  EXPECT_THROW(s.sample_from_noise(torch::tensor({1, 2}, torch::kInt64), torch::randn({2, 3, 4, 4}), noise_fn),
               Error);                                                                  // latent shape
  // A model with the wrong number of output channels.
  Sampler bad([](const torch::Tensor& x, const torch::Tensor&, const torch::Tensor&) { return x; }, tiny_options());
  EXPECT_THROW(bad.sample(torch::tensor({1}, torch::kInt64)), Error);
  EXPECT_EQ(s.sample(torch::zeros({0}, torch::kInt64)).size(0), 0);
}
