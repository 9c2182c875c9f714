// DiT and DiffFit: golden parity with the reference (tests/data MANIFEST.json cases dit_small,
// dit_difffit, key_lists), plus shape/label errors, label dropout and presets.
#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <string>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "mdd/io/state_dict.h"
#include "mdd/models/difffit.h"
#include "mdd/models/dit.h"
#include "mdd/diffusion/guidance.h"
#include "mdd/util/precision.h"
#include "mdd/util/error.h"
#include "models/fused_dit.h"  // the kernels, for their own tests
#include "util/cpu_kernels.h"
#include "util/torch_compat.h"
#include "test_util.h"

namespace {

using mdd_test::AllClose;
using mdd_test::golden;

nlohmann::json read_json(const std::string& name) {
  std::ifstream in(mdd_test::data_path(name));
  EXPECT_TRUE(in.good()) << name;
  return nlohmann::json::parse(in);
}

const nlohmann::json& manifest_cases() {
  static const nlohmann::json cases = read_json("MANIFEST.json").at("cases");
  return cases;
}

// suggested_atol of `tensor` in MANIFEST case `case_name` (never loosened here).
double atol_of(const std::string& case_name, const std::string& tensor) {
  return manifest_cases().at(case_name).at("tensors").at(tensor).at("suggested_atol").get<double>();
}

// The constructor arguments recorded in the MANIFEST case.
mdd::DiTOptions manifest_options(const std::string& case_name) {
  const auto& c = manifest_cases().at(case_name).at("constructor");
  return mdd::DiTOptions(c.at("input_size"), c.at("patch_size"), c.at("in_channels"), c.at("hidden_size"),
                         c.at("depth"), c.at("num_heads"))
      .mlp_ratio(c.at("mlp_ratio"))
      .class_dropout_prob(c.at("class_dropout_prob"))
      .num_classes(c.at("num_classes"))
      .learn_sigma(c.at("learn_sigma"));
}

std::string fmt_err(double err, double atol) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.3g (atol %.3g)", err, atol);
  return buf;
}

mdd::DiT small_model() { return mdd::DiT(manifest_options("dit_small")); }

// Every tensor with a suggested_atol in the case, compared against the taps.
void check_all_taps(const std::string& case_name, const mdd::DiTTaps& taps, const mdd::io::TensorMap& io) {
  std::map<std::string, torch::Tensor> actual = {
      {"t_freq", taps.t_freq},          {"t_emb", taps.t_emb},
      {"y_emb", taps.y_emb},            {"c", taps.c},
      {"x_tokens_pos", taps.x_tokens_pos}, {"final_layer_out", taps.final_layer_out},
      {"out", taps.out},
  };
  for (size_t i = 0; i < taps.blocks.size(); ++i) {
    const std::string b = "block" + std::to_string(i) + "_";
    actual[b + "adaLN"] = taps.blocks[i].adaLN;
    actual[b + "attn"] = taps.blocks[i].attn;
    actual[b + "mlp"] = taps.blocks[i].mlp;
    actual[b + "out"] = taps.blocks[i].out;
  }
  int checked = 0;
  for (const auto& [name, meta] : manifest_cases().at(case_name).at("tensors").items()) {
    if (!meta.contains("suggested_atol") || name.rfind("cfg_", 0) == 0) continue;
    auto it = actual.find(name);
    ASSERT_NE(it, actual.end()) << "no tap for MANIFEST tensor " << name;
    const double atol = meta.at("suggested_atol").get<double>();
    EXPECT_TRUE(AllClose(it->second, io.at(name), atol)) << case_name << "/" << name;
    // Visible with --gtest_output=xml: the measured error next to its tolerance.
    ::testing::Test::RecordProperty(case_name + "/" + name,
                                    fmt_err(mdd_test::max_abs_diff(it->second, io.at(name)), atol));
    ++checked;
  }
  EXPECT_EQ(checked, 12) << "fewer golden tensors than expected in " << case_name;
}

}  // namespace

// ------------------------------------------------------------------ golden parity

TEST(DiT, GoldenSmallEveryTapAndOutput) {
  auto model = small_model();
  mdd::load_state_dict(*model, golden("dit_small.weights.safetensors"), /*strict=*/true);
  model->eval();
  torch::NoGradGuard no_grad;
  const auto io = golden("dit_small.io.safetensors");
  mdd::DiTTaps taps;
  auto out = model->forward_with_taps(io.at("x"), io.at("t"), io.at("y"), taps);
  ASSERT_EQ(taps.blocks.size(), 2u);
  check_all_taps("dit_small", taps, io);
  // The plain forward of a model without the fused kernels is the same computation.
  auto plain = mdd::DiT(manifest_options("dit_small").fused(false));
  mdd::load_state_dict(*plain, golden("dit_small.weights.safetensors"), /*strict=*/true);
  plain->eval();
  EXPECT_TRUE(torch::equal(plain->forward(io.at("x"), io.at("t"), io.at("y")), out));
}

TEST(DiT, GoldenSmallForwardWithCfg) {
  auto model = small_model();
  mdd::load_state_dict(*model, golden("dit_small.weights.safetensors"));
  model->eval();
  torch::NoGradGuard no_grad;
  const auto io = golden("dit_small.io.safetensors");
  auto out = model->forward_with_cfg(io.at("cfg_x"), io.at("cfg_t"), io.at("cfg_y"), io.at("cfg_scale").item<double>());
  EXPECT_TRUE(AllClose(out, io.at("cfg_out"), atol_of("dit_small", "cfg_out")));
  RecordProperty("dit_small/cfg_out", fmt_err(mdd_test::max_abs_diff(out, io.at("cfg_out")), atol_of("dit_small", "cfg_out")));
  // The second half of x is ignored by the reference rule.
  auto x2 = io.at("cfg_x").clone();
  x2.narrow(0, 3, 3).normal_();
  auto out2 = model->forward_with_cfg(x2, io.at("cfg_t"), io.at("cfg_y"), io.at("cfg_scale").item<double>());
  EXPECT_TRUE(torch::equal(out, out2));
}

TEST(DiT, CfgAllEpsChannelsOption) {
  auto model = small_model();
  mdd::load_state_dict(*model, golden("dit_small.weights.safetensors"));
  model->eval();
  torch::NoGradGuard no_grad;
  const auto io = golden("dit_small.io.safetensors");
  const double s = 2.5;
  auto x = io.at("cfg_x"), t = io.at("cfg_t"), y = io.at("cfg_y");
  auto raw = model->forward(torch::cat({x.narrow(0, 0, 3), x.narrow(0, 0, 3)}), t, y);
  auto all = model->forward_with_cfg(x, t, y, s, mdd::DiTImpl::kAllEpsChannels);
  auto ref3 = model->forward_with_cfg(x, t, y, s, mdd::DiTImpl::kReferenceGuidedChannels);
  EXPECT_TRUE(torch::equal(ref3, model->forward_with_cfg(x, t, y, s)));
  auto cond = raw.narrow(0, 0, 3), uncond = raw.narrow(0, 3, 3);
  auto guided = uncond.narrow(1, 0, 4) + s * (cond.narrow(1, 0, 4) - uncond.narrow(1, 0, 4));
  for (int half = 0; half < 2; ++half) {
    EXPECT_TRUE(torch::equal(all.narrow(0, 3 * half, 3).narrow(1, 0, 4), guided));
    EXPECT_TRUE(torch::equal(all.narrow(1, 4, 4), raw.narrow(1, 4, 4)));
    // Reference rule: channel 3 stays raw per half.
    EXPECT_TRUE(torch::equal(ref3.narrow(1, 3, 5), raw.narrow(1, 3, 5)));
    EXPECT_TRUE(torch::equal(ref3.narrow(0, 3 * half, 3).narrow(1, 0, 3), guided.narrow(1, 0, 3)));
  }
  EXPECT_THROW(model->forward_with_cfg(x, t, y, s, 0), mdd::Error);
  EXPECT_THROW(model->forward_with_cfg(x, t, y, s, 9), mdd::Error);
}

TEST(DiT, PosEmbedMatchesReferenceTable) {
  auto model = small_model();
  const auto w = golden("dit_small.weights.safetensors");
  // Same float64 -> float32 table as the reference (not redrawn in the fixture).
  EXPECT_TRUE(AllClose(model->pos_embed, w.at("pos_embed"), 1e-6));
  EXPECT_FALSE(model->pos_embed.requires_grad());
}

TEST(DiffFit, GoldenEveryTapAndOutput) {
  auto model = small_model();
  mdd::apply_difffit(model);
  mdd::load_state_dict(*model, golden("dit_difffit.weights.safetensors"), /*strict=*/true);
  model->eval();
  torch::NoGradGuard no_grad;
  const auto io = golden("dit_difffit.io.safetensors");
  mdd::DiTTaps taps;
  model->forward_with_taps(io.at("x"), io.at("t"), io.at("y"), taps);
  check_all_taps("dit_difffit", taps, io);
}

TEST(DiffFit, UnitGammasReproducePlainModelExactly) {
  auto plain = small_model();
  auto fitted = small_model();
  const auto w = golden("dit_small.weights.safetensors");
  mdd::load_state_dict(*plain, w);
  mdd::apply_difffit(fitted);
  auto report = mdd::load_state_dict(*fitted, w, /*strict=*/false);
  // Only the gammas are missing (like train_dit.py's strict=False load, but checked).
  const auto& expected_missing = manifest_cases().at("dit_difffit").at("missing_keys_when_loading_plain_DiT_state_dict");
  EXPECT_EQ(std::set<std::string>(report.missing.begin(), report.missing.end()),
            expected_missing.get<std::set<std::string>>());
  EXPECT_TRUE(report.unexpected.empty());
  EXPECT_TRUE(report.mismatched.empty());
  plain->eval();
  fitted->eval();
  torch::NoGradGuard no_grad;
  const auto io = golden("dit_small.io.safetensors");
  EXPECT_TRUE(torch::equal(plain->forward(io.at("x"), io.at("t"), io.at("y")),
                           fitted->forward(io.at("x"), io.at("t"), io.at("y"))));
}

TEST(DiffFit, CloneIsAnIndependentDeepCopyWithGammas) {
  auto model = small_model();
  mdd::load_state_dict(*model, golden("dit_small.weights.safetensors"));
  mdd::apply_difffit(model, mdd::DiffFitOptions().gamma_blocks(1));
  {
    // Gammas away from 1, so the copy is only right if their values (not a fresh init) are copied.
    torch::NoGradGuard no_grad;
    for (auto& p : model->named_parameters())
      if (p.key().find("gamma") != std::string::npos) p.value().fill_(0.75);
  }
  model->eval();
  auto copy = mdd::DiT(std::dynamic_pointer_cast<mdd::DiTImpl>(model->clone()));
  ASSERT_TRUE(copy);
  EXPECT_TRUE(mdd::has_difffit(copy));
  EXPECT_FALSE(copy->is_training());
  const auto a = mdd::state_dict(*model), b = mdd::state_dict(*copy);
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [k, v] : a) {
    ASSERT_TRUE(b.count(k)) << k;
    EXPECT_TRUE(torch::equal(v, b.at(k))) << k;
    EXPECT_NE(v.data_ptr(), b.at(k).data_ptr()) << k << " shares storage with the original";
  }
  ASSERT_TRUE(copy->block(0)->has_gammas());
  EXPECT_FALSE(copy->block(1)->has_gammas());
  torch::NoGradGuard no_grad;
  const auto io = golden("dit_small.io.safetensors");
  const auto before = model->forward(io.at("x"), io.at("t"), io.at("y"));
  EXPECT_TRUE(torch::equal(before, copy->forward(io.at("x"), io.at("t"), io.at("y"))));
  // Changing the copy (through its blocks, as DiT::block hands them out) leaves the original alone.
  copy->block(0)->gamma1.fill_(2.0);
  EXPECT_TRUE(torch::equal(before, model->forward(io.at("x"), io.at("t"), io.at("y"))));
  EXPECT_FALSE(torch::equal(before, copy->forward(io.at("x"), io.at("t"), io.at("y"))));
}

TEST(DiffFit, TrainableSetAndGradients) {
  auto model = small_model();
  mdd::apply_difffit(model);
  std::set<std::string> trainable;
  int64_t numel = 0;
  for (const auto& p : model->named_parameters())
    if (p.value().requires_grad()) {
      trainable.insert(p.key());
      numel += p.value().numel();
    }
  const auto expected = manifest_cases().at("dit_difffit").at("difffit_trainable_keys").get<std::set<std::string>>();
  EXPECT_EQ(trainable, expected);
  int64_t via_api = 0;
  for (const auto& p : mdd::trainable_parameters(*model)) via_api += p.numel();
  EXPECT_EQ(via_api, numel);
  EXPECT_EQ(mdd::trainable_parameters(*model).size(), expected.size());

  // Gradients reach exactly the trainable parameters.
  mdd::load_state_dict(*model, golden("dit_difffit.weights.safetensors"));
  model->train();
  auto gen = at::detail::createCPUGenerator(7);
  model->set_label_dropout_generator(gen);
  const auto io = golden("dit_difffit.io.safetensors");
  model->forward(io.at("x"), io.at("t"), io.at("y")).square().sum().backward();
  for (const auto& p : model->named_parameters()) {
    if (expected.count(p.key())) {
      ASSERT_TRUE(p.value().grad().defined()) << p.key();
    } else {
      EXPECT_FALSE(p.value().grad().defined()) << p.key();
    }
  }
  EXPECT_THROW(mdd::apply_difffit(model), mdd::Error);  // documented: not idempotent
}

TEST(DiffFit, GammaBlocksLimitsKeys) {
  auto model = small_model();
  mdd::apply_difffit(model, mdd::DiffFitOptions().gamma_blocks(1));
  const auto sd = mdd::state_dict(*model);
  EXPECT_TRUE(sd.count("blocks.0.gamma1") && sd.count("blocks.0.gamma2") && sd.count("blocks.0.attn.gamma1") &&
              sd.count("blocks.0.attn.gamma2"));
  EXPECT_EQ(sd.at("blocks.0.attn.gamma1").sizes(), torch::IntArrayRef({192}));
  for (const auto& kv : sd) EXPECT_EQ(kv.first.find("blocks.1.") == 0 && kv.first.find("gamma") != std::string::npos, false) << kv.first;
  EXPECT_TRUE(mdd::has_difffit(model));
  EXPECT_FALSE(mdd::has_difffit(small_model()));
  EXPECT_THROW(mdd::apply_difffit(model, mdd::DiffFitOptions().gamma_blocks(-1)), mdd::Error);
}

// ------------------------------------------------------------------ DiT-XL/2 key lists

TEST(DiT, XL2KeysShapesAndDiffFitCounts) {
  const auto keys = read_json("dit_xl2_keys.json");
  const auto fkeys = read_json("dit_xl2_difffit_keys.json");
  mdd::DiT model(mdd::dit_options("DiT-XL/2"));  // ~2.7 GB, built once
  {
    const auto sd = mdd::state_dict(*model);
    ASSERT_EQ(sd.size(), keys.at("num_state_dict_keys").get<size_t>());
    int64_t total = 0;
    for (const auto& k : keys.at("keys")) {
      const auto name = k.at("key").get<std::string>();
      auto it = sd.find(name);
      ASSERT_NE(it, sd.end()) << name;
      EXPECT_EQ(it->second.sizes().vec(), k.at("shape").get<std::vector<int64_t>>()) << name;
      total += it->second.numel();
    }
    EXPECT_EQ(total, keys.at("total_parameters_incl_pos_embed").get<int64_t>());
    EXPECT_EQ(total, 675129632);
    for (const auto& p : model->named_parameters()) EXPECT_EQ(p.value().requires_grad(), p.key() != "pos_embed") << p.key();
    EXPECT_TRUE(model->buffers().empty());
  }
  mdd::apply_difffit(model);
  const auto sd = mdd::state_dict(*model);
  ASSERT_EQ(sd.size(), 348u);
  ASSERT_EQ(sd.size(), fkeys.at("num_state_dict_keys").get<size_t>());
  std::set<std::string> trainable_keys;
  int64_t trainable = 0;
  for (const auto& p : model->named_parameters())
    if (p.value().requires_grad()) {
      trainable_keys.insert(p.key());
      trainable += p.value().numel();
    }
  for (const auto& k : fkeys.at("keys")) {
    const auto name = k.at("key").get<std::string>();
    auto it = sd.find(name);
    ASSERT_NE(it, sd.end()) << name;
    EXPECT_EQ(it->second.sizes().vec(), k.at("shape").get<std::vector<int64_t>>()) << name;
    EXPECT_EQ(trainable_keys.count(name) == 1, k.at("trainable_under_difffit").get<bool>()) << name;
  }
  EXPECT_EQ(trainable_keys, fkeys.at("difffit_trainable_keys").get<std::set<std::string>>());
  EXPECT_EQ(trainable_keys.size(), 202u);
  EXPECT_EQ(trainable, 1739552);
  EXPECT_EQ(trainable, fkeys.at("difffit_trainable_parameters").get<int64_t>());
  int64_t via_api = 0;
  for (const auto& p : mdd::trainable_parameters(*model)) via_api += p.numel();
  EXPECT_EQ(via_api, 1739552);
}

// ------------------------------------------------------------------ behaviour

TEST(DiT, LabelDropoutOnlyInTrainModeAndSeeded) {
  auto opts = manifest_options("dit_small").class_dropout_prob(0.25);
  mdd::DiT model(opts);
  torch::NoGradGuard no_grad;
  const int64_t n = 1000;
  auto x = torch::zeros({n, 4, 8, 8});
  auto t = torch::full({n}, 5, torch::kLong);
  auto y = torch::arange(n, torch::kLong).remainder(10);
  const auto table = model->y_embedder->embedding_table->weight;
  auto count_null = [&](const mdd::DiTTaps& taps) {
    auto is_null = (taps.y_emb - table[model->null_class()]).abs().amax(1).eq(0);
    auto is_own = (taps.y_emb - table.index_select(0, y)).abs().amax(1).eq(0);
    EXPECT_TRUE((is_null | is_own).all().item<bool>()) << "rows must be the label's or the null row";
    return is_null.sum().item<int64_t>();
  };
  mdd::DiTTaps taps;
  model->eval();
  model->forward_with_taps(x, t, y, taps);
  EXPECT_EQ(count_null(taps), 0);

  model->train();
  model->set_label_dropout_generator(at::detail::createCPUGenerator(42));
  model->forward_with_taps(x, t, y, taps);
  const int64_t dropped = count_null(taps);
  // Binomial(1000, 0.25): sd of the rate ~0.0137; 0.05 is a 3.6 sd band (and the draw is seeded).
  EXPECT_NEAR(static_cast<double>(dropped) / n, 0.25, 0.05);
  auto first = taps.y_emb.clone();
  model->set_label_dropout_generator(at::detail::createCPUGenerator(42));
  model->forward_with_taps(x, t, y, taps);
  EXPECT_TRUE(torch::equal(first, taps.y_emb)) << "same seed must give the same drops";

  // No dropout at all when class_dropout_prob = 0 (and then no null row).
  mdd::DiT no_drop(manifest_options("dit_small").class_dropout_prob(0.0));
  EXPECT_EQ(no_drop->y_embedder->embedding_table->weight.size(0), 10);
  no_drop->train();
  EXPECT_THROW(no_drop->forward(x.narrow(0, 0, 2), t.narrow(0, 0, 2), torch::full({2}, 10, torch::kLong)), mdd::Error);
}

TEST(MddCheck, ThrowsOnlyOnFailureAndBuildsTheMessageOnlyThen) {
  int built = 0;
  auto message = [&built] {
    ++built;
    return std::string("the message, with, commas");
  };
  EXPECT_NO_THROW(MDD_CHECK(1 + 1 == 2, message()));
  EXPECT_EQ(built, 0);
  try {
    MDD_CHECK(1 + 1 == 3, message());
    ADD_FAILURE() << "MDD_CHECK did not throw";
  } catch (const mdd::Error& e) {
    EXPECT_STREQ(e.what(), "the message, with, commas");
  }
  EXPECT_EQ(built, 1);
}

TEST(DiT, BadInputsThrow) {
  auto model = small_model();
  model->eval();
  torch::NoGradGuard no_grad;
  auto x = torch::randn({2, 4, 8, 8});
  auto t = torch::tensor({1, 2}, torch::kLong);
  auto y = torch::tensor({0, 10}, torch::kLong);
  EXPECT_NO_THROW(model->forward(x, t, y));
  EXPECT_THROW(model->forward(torch::randn({4, 8, 8}), t, y), mdd::Error);        // not 4-D
  EXPECT_THROW(model->forward(torch::randn({2, 3, 8, 8}), t, y), mdd::Error);     // channels
  EXPECT_THROW(model->forward(torch::randn({2, 4, 9, 9}), t, y), mdd::Error);     // H % patch
  EXPECT_THROW(model->forward(torch::randn({2, 4, 10, 10}), t, y), mdd::Error);   // H != input_size
  EXPECT_THROW(model->forward(x, torch::tensor({1, 2, 3}), y), mdd::Error);       // t batch
  EXPECT_THROW(model->forward(x, t, torch::tensor({1}, torch::kLong)), mdd::Error);  // y batch
  EXPECT_THROW(model->forward(x, t, torch::tensor({0, 11}, torch::kLong)), mdd::Error);  // label range
  EXPECT_THROW(model->forward(x, t, torch::tensor({-1, 0}, torch::kLong)), mdd::Error);
  EXPECT_THROW(model->forward(x, t, torch::tensor({0.f, 1.f})), mdd::Error);      // float labels
  EXPECT_THROW(model->forward_with_cfg(torch::randn({3, 4, 8, 8}), torch::tensor({1, 2, 3}),
                                       torch::tensor({0, 1, 10}, torch::kLong), 4.0),
               mdd::Error);  // odd batch
  try {
    model->forward(torch::randn({2, 3, 8, 8}), t, y);
  } catch (const mdd::Error& e) {
    EXPECT_NE(std::string(e.what()).find("3 channels"), std::string::npos) << e.what();
  }
  EXPECT_THROW(mdd::DiT(mdd::DiTOptions(8, 2, 4, 66, 1, 4)), mdd::Error);  // 66 % 4 heads
  EXPECT_THROW(mdd::DiT(mdd::DiTOptions(9, 2, 4, 64, 1, 4)), mdd::Error);  // 9 % patch 2
  EXPECT_THROW(model->block(2), mdd::Error);
}

TEST(DiT, PresetsMatchReferenceTable) {
  struct Row {
    const char* name;
    int64_t depth, hidden, heads, patch;
  };
  // DiT models.py:328-370 (reference §4.1).
  const Row rows[] = {{"DiT-XL/2", 28, 1152, 16, 2}, {"DiT-XL/4", 28, 1152, 16, 4}, {"DiT-XL/8", 28, 1152, 16, 8},
                      {"DiT-L/2", 24, 1024, 16, 2},  {"DiT-L/4", 24, 1024, 16, 4},  {"DiT-L/8", 24, 1024, 16, 8},
                      {"DiT-B/2", 12, 768, 12, 2},   {"DiT-B/4", 12, 768, 12, 4},   {"DiT-B/8", 12, 768, 12, 8},
                      {"DiT-S/2", 12, 384, 6, 2},    {"DiT-S/4", 12, 384, 6, 4},    {"DiT-S/8", 12, 384, 6, 8}};
  ASSERT_EQ(mdd::dit_model_names().size(), 12u);
  for (const auto& r : rows) {
    const auto o = mdd::dit_options(r.name, 16, 10);
    EXPECT_EQ(o.depth(), r.depth) << r.name;
    EXPECT_EQ(o.hidden_size(), r.hidden) << r.name;
    EXPECT_EQ(o.num_heads(), r.heads) << r.name;
    EXPECT_EQ(o.patch_size(), r.patch) << r.name;
    EXPECT_EQ(o.in_channels(), 4);
    EXPECT_EQ(o.input_size(), 16);
    EXPECT_EQ(o.num_classes(), 10);
    EXPECT_DOUBLE_EQ(o.mlp_ratio(), 4.0);
    EXPECT_DOUBLE_EQ(o.class_dropout_prob(), 0.1);
    EXPECT_TRUE(o.learn_sigma());
    EXPECT_EQ(o.out_channels(), 8);
  }
  const auto d = mdd::dit_options("DiT-XL/2");
  EXPECT_EQ(d.input_size(), 32);
  EXPECT_EQ(d.num_classes(), 1000);
  try {
    mdd::dit_options("DiT-XXL/2");
    FAIL() << "unknown preset accepted";
  } catch (const mdd::Error& e) {
    EXPECT_NE(std::string(e.what()).find("DiT-S/8"), std::string::npos) << e.what();
  }
  // One small preset end to end.
  mdd::DiT s8(mdd::dit_options("DiT-S/8", 16, 10));
  s8->eval();
  torch::NoGradGuard no_grad;
  auto out = s8->forward(torch::randn({2, 4, 16, 16}), torch::tensor({10, 500}), torch::tensor({int64_t{3}, s8->null_class()}));
  EXPECT_EQ(out.sizes(), torch::IntArrayRef({2, 8, 16, 16}));
  // adaLN-Zero init: a fresh model predicts exactly zero.
  EXPECT_EQ(out.abs().max().item<float>(), 0.f);
}

TEST(DiT, SeededInitialisationIsReproducible) {
  auto a = small_model(), b = small_model();
  a->initialize_weights(at::detail::createCPUGenerator(3));
  b->initialize_weights(at::detail::createCPUGenerator(3));
  const auto sa = mdd::state_dict(*a), sb = mdd::state_dict(*b);
  for (const auto& kv : sa) EXPECT_TRUE(torch::equal(kv.second, sb.at(kv.first))) << kv.first;
  // Reference init: zero biases, zero adaLN, N(0, 0.02) label table.
  EXPECT_EQ(sa.at("blocks.0.adaLN_modulation.1.weight").abs().max().item<float>(), 0.f);
  EXPECT_EQ(sa.at("blocks.1.attn.qkv.bias").abs().max().item<float>(), 0.f);
  EXPECT_NEAR(sa.at("y_embedder.embedding_table.weight").std().item<double>(), 0.02, 0.005);
  const double bound = std::sqrt(6.0 / (64 + 192));
  EXPECT_LE(sa.at("blocks.0.attn.qkv.weight").abs().max().item<double>(), bound);
}

// ------------------------------------------------------------------ guidance and mixed precision

TEST(DiT, CfgReferenceRuleOnOneChannelGuidesEpsAndVariance) {
  // One image channel with learned sigma: the output has 2 channels and the reference's
  // model_out[:, :3] covers both, so both are guided (the rule used to be refused here).
  mdd::DiT model(mdd::DiTOptions(8, 2, 1, 32, 2, 2).num_classes(3));
  model->eval();
  torch::NoGradGuard no_grad;
  auto gen = at::detail::createCPUGenerator(3);
  {
    torch::NoGradGuard ng;
    for (auto& p : model->parameters()) p.add_(torch::randn(p.sizes(), gen) * 0.05);
  }
  auto x = torch::randn({4, 1, 8, 8}, gen);
  auto t = torch::tensor({10, 500, 10, 500}, torch::kInt64);
  auto y = torch::tensor({0, 2, 3, 3}, torch::kInt64);
  const double s = 2.0;
  auto raw = model->forward(torch::cat({x.narrow(0, 0, 2), x.narrow(0, 0, 2)}), t, y);
  auto ref = model->forward_with_cfg(x, t, y, s);
  auto guided = raw.narrow(0, 2, 2) + s * (raw.narrow(0, 0, 2) - raw.narrow(0, 2, 2));
  ASSERT_EQ(ref.sizes(), raw.sizes());
  EXPECT_TRUE(torch::equal(ref.narrow(0, 0, 2), guided));
  EXPECT_TRUE(torch::equal(ref.narrow(0, 2, 2), guided));
  // "all" guides only the eps channel; the variance comes from each half.
  auto all = model->forward_with_cfg(x, t, y, s, mdd::DiTImpl::kAllEpsChannels);
  EXPECT_TRUE(torch::equal(all.narrow(1, 0, 1).narrow(0, 0, 2), guided.narrow(1, 0, 1)));
  EXPECT_TRUE(torch::equal(all.narrow(1, 1, 1), raw.narrow(1, 1, 1)));
}

TEST(DiT, CfgCombineIsTheSamplerAndModelRule) {
  auto gen = at::detail::createCPUGenerator(5);
  auto out = torch::randn({6, 8, 4, 4}, gen);
  auto c = mdd::cfg_combine(out, 3.0, 3);
  auto cond = out.narrow(0, 0, 3), uncond = out.narrow(0, 3, 3);
  EXPECT_TRUE(torch::equal(c.narrow(1, 0, 3), uncond.narrow(1, 0, 3) + 3.0 * (cond.narrow(1, 0, 3) - uncond.narrow(1, 0, 3))));
  EXPECT_TRUE(torch::equal(c.narrow(1, 3, 5), cond.narrow(1, 3, 5)));
  EXPECT_EQ(mdd::cfg_guided_channels(mdd::CfgGuidance::kReference3Channels, 4, 8), 3);
  EXPECT_EQ(mdd::cfg_guided_channels(mdd::CfgGuidance::kReference3Channels, 1, 2), 2);
  EXPECT_EQ(mdd::cfg_guided_channels(mdd::CfgGuidance::kAllEpsChannels, 4, 8), 4);
  EXPECT_EQ(mdd::parse_cfg_guidance("all"), mdd::CfgGuidance::kAllEpsChannels);
  EXPECT_STREQ(mdd::cfg_guidance_name(mdd::CfgGuidance::kReference3Channels), "reference");
  EXPECT_THROW(mdd::parse_cfg_guidance("al"), mdd::Error);
  EXPECT_THROW(mdd::cfg_combine(out.narrow(0, 0, 5), 2.0, 3), mdd::Error);
  EXPECT_THROW(mdd::cfg_combine(out, 2.0, 9), mdd::Error);
}

// bf16 autocast against the golden fp32 reference outputs. bf16 keeps 8 mantissa bits (relative
// rounding 2^-9 = 2e-3 per operation); through two blocks of matmuls and LayerNorms the stated
// tolerance is 3 % of the output's largest magnitude, and the mean error must stay below 0.5 %.
TEST(DiT, GoldenSmallUnderBf16AutocastWithinStatedTolerance) {
  auto model = small_model();
  mdd::load_state_dict(*model, golden("dit_small.weights.safetensors"), /*strict=*/true);
  model->eval();
  torch::NoGradGuard no_grad;
  const auto io = golden("dit_small.io.safetensors");
  torch::Tensor out;
  {
    mdd::AutocastGuard autocast(torch::kCPU, mdd::Precision::kBF16);
    out = model->forward(io.at("x"), io.at("t"), io.at("y"));
    // The matrix products really ran in bf16.
    EXPECT_EQ(torch::matmul(io.at("x").flatten(1), io.at("x").flatten(1).t()).scalar_type(), torch::kBFloat16);
  }
  out = out.to(torch::kFloat32);
  const auto ref = io.at("out");
  const double scale = ref.abs().max().item<double>();
  const double max_err = mdd_test::max_abs_diff(out, ref);
  const double mean_err = (out.to(torch::kFloat64) - ref.to(torch::kFloat64)).abs().mean().item<double>();
  EXPECT_LE(max_err, 0.03 * scale) << "max err " << max_err << " scale " << scale;
  EXPECT_LE(mean_err, 0.005 * scale) << "mean err " << mean_err;
  EXPECT_GT(max_err, 0.0) << "bf16 autocast changed nothing: did it run?";
  RecordProperty("dit_small/out_bf16", fmt_err(max_err, 0.03 * scale));
  // Outside the guard fp32 is back.
  EXPECT_EQ(torch::matmul(io.at("x").flatten(1), io.at("x").flatten(1).t()).scalar_type(), torch::kFloat32);
}

// The attention alone, with peaked scores (large inputs) so that a wrong scale or softmax axis in
// the explicit bf16 training path shows: bf16-with-grad vs fp32, outputs and input gradients.
TEST(DiT, AttentionBf16TrainingPathMatchesFp32) {
  // The bound below assumes bf16 products accumulated in float32 (oneDNN on CPUs with AVX-512,
  // LibTorch 2.x). LibTorch 1.13 on CPUs without AVX-512 (an AMD EPYC here) falls back to a GEMM
  // that accumulates in bf16, several times less exact; `Precision::kAuto` never picks bf16 there.
  {
    auto g0 = at::detail::createCPUGenerator(1);
    const auto a = torch::randn({16, 512}, g0).to(torch::kBFloat16), b = torch::randn({512, 16}, g0).to(torch::kBFloat16);
    const auto ref = torch::matmul(a.to(torch::kFloat32), b.to(torch::kFloat32));
    const double rel = (torch::matmul(a, b).to(torch::kFloat32) - ref).abs().max().item<double>() / ref.abs().max().item<double>();
    if (rel > 0.01)
      GTEST_SKIP() << "this LibTorch's CPU bf16 matmul does not accumulate in float32 here (relative error " << rel
                   << " on a 512-term product); the bf16 path is not used on such CPUs";
  }
  torch::manual_seed(5);
  mdd::DiTAttention attn(64, 4);
  auto g = at::detail::createCPUGenerator(6);
  const auto x0 = torch::randn({3, 20, 64}, g) * 4;
  const auto cot = torch::randn({3, 20, 64}, g);
  auto run = [&](mdd::Precision p) {
    auto x = x0.clone().requires_grad_(true);
    torch::Tensor out;
    {
      mdd::AutocastGuard autocast(torch::kCPU, p);
      out = attn->forward(x);
    }
    EXPECT_EQ(out.scalar_type(), p == mdd::Precision::kBF16 ? torch::kBFloat16 : torch::kFloat32);
    out = out.to(torch::kFloat32);
    (out * cot).sum().backward();
    return std::make_pair(out.detach(), x.grad());
  };
  const auto [o16, gx16] = run(mdd::Precision::kBF16);
  const auto [o32, gx32] = run(mdd::Precision::kFP32);
  const double scale = o32.abs().max().item<double>();
  EXPECT_LE(mdd_test::max_abs_diff(o16, o32), 0.02 * scale);
  const double cos = (gx16 * gx32).sum().item<double>() / (gx16.norm().item<double>() * gx32.norm().item<double>());
  EXPECT_GT(cos, 0.999) << "input-gradient cosine " << cos;
}

// A bf16 forward that autograd records takes the explicit attention path on the CPU (LibTorch's
// bf16 flash-attention backward is slow there); it must give the golden output within the bf16
// tolerance above, agree with the no-grad bf16 forward, and give fp32-like gradients.
TEST(DiT, Bf16TrainingForwardMatchesGoldenAndFp32Gradients) {
  auto model = small_model();
  mdd::load_state_dict(*model, golden("dit_small.weights.safetensors"), /*strict=*/true);
  model->eval();  // no label dropout: the same forward as the golden one, but recorded
  const auto io = golden("dit_small.io.safetensors");
  const auto ref = io.at("out");
  const double scale = ref.abs().max().item<double>();
  auto grads = [&](mdd::Precision p) {
    model->zero_grad();
    torch::Tensor out;
    {
      mdd::AutocastGuard autocast(torch::kCPU, p);
      out = model->forward(io.at("x"), io.at("t"), io.at("y"));
    }
    out = out.to(torch::kFloat32);
    // A fixed random cotangent so every output element contributes.
    auto g = at::detail::createCPUGenerator(3);
    (out * torch::randn(out.sizes(), g)).sum().backward();
    std::vector<torch::Tensor> gs;
    for (const auto& prm : model->parameters())
      if (prm.grad().defined()) gs.push_back(prm.grad().flatten().clone());
    return std::make_pair(out.detach(), torch::cat(gs));
  };
  const auto [out16, g16] = grads(mdd::Precision::kBF16);
  const auto [out32, g32] = grads(mdd::Precision::kFP32);
  const double max_err = mdd_test::max_abs_diff(out16, ref);
  EXPECT_LE(max_err, 0.03 * scale) << "max err " << max_err << " scale " << scale;
  EXPECT_GT(max_err, 0.0) << "bf16 autocast changed nothing: did it run?";
  EXPECT_TRUE(AllClose(out32, ref, atol_of("dit_small", "out")));
  torch::Tensor out_nograd;
  {
    torch::NoGradGuard ng;
    mdd::AutocastGuard autocast(torch::kCPU, mdd::Precision::kBF16);
    out_nograd = model->forward(io.at("x"), io.at("t"), io.at("y")).to(torch::kFloat32);
  }
  EXPECT_LE(mdd_test::max_abs_diff(out16, out_nograd), 0.03 * scale);
  // Gradients: direction and size of the whole parameter gradient.
  const double cos = (g16 * g32).sum().item<double>() / (g16.norm().item<double>() * g32.norm().item<double>());
  const double rel = (g16.norm() / g32.norm()).item<double>();
  EXPECT_GT(cos, 0.995) << "bf16 vs fp32 gradient cosine " << cos;
  EXPECT_NEAR(rel, 1.0, 0.02);
  RecordProperty("dit_small/bf16_grad_cosine", std::to_string(cos));
}

// ------------------------------------------------------------------ fused CPU inference

// The fused path (a no-grad CPU forward, the default) against the golden outputs at their own
// tolerances, for the plain and the DiffFit model, and against the module path (fused off).
TEST(DiTFused, GoldenOutputsAtTheirTolerances) {
  for (const std::string name : {"dit_small", "dit_difffit"}) {
    SCOPED_TRACE(name);
    const auto weights = golden(name + ".weights.safetensors");
    auto make = [&](bool fused) {
      auto m = mdd::DiT(manifest_options("dit_small").fused(fused));
      if (name == "dit_difffit") mdd::apply_difffit(m);
      mdd::load_state_dict(*m, weights, /*strict=*/true);
      m->eval();
      return m;
    };
    auto fused = make(true), plain = make(false);
    torch::NoGradGuard no_grad;
    const auto io = golden(name + ".io.safetensors");
    const auto t = io.at("t"), y = io.at("y");
    ASSERT_EQ(mdd::detail::fused_dit_mode(torch::zeros({1, 1, 4}), torch::zeros({4})), mdd::detail::FusedDiTMode::kFP32);
    const auto out = fused->forward(io.at("x"), t, y);
    EXPECT_TRUE(AllClose(out, io.at("out"), atol_of(name, "out")));
    RecordProperty(name + "/out_fused", fmt_err(mdd_test::max_abs_diff(out, io.at("out")), atol_of(name, "out")));
    EXPECT_TRUE(AllClose(out, plain->forward(io.at("x"), t, y), atol_of(name, "out")));
    EXPECT_FALSE(torch::equal(out, plain->forward(io.at("x"), t, y))) << "the fused path did not run";
    const double s = io.at("cfg_scale").item<double>();
    EXPECT_TRUE(AllClose(fused->forward_with_cfg(io.at("cfg_x"), io.at("cfg_t"), io.at("cfg_y"), s), io.at("cfg_out"),
                         atol_of(name, "cfg_out")));
  }
}

// Recording autograd, a tap request or fused(false) all take the module path; bf16 autocast
// takes the bf16 fused path, within the bf16 tolerance of the fp32 golden output.
TEST(DiTFused, ModeSelectionAndBf16Path) {
  using mdd::detail::FusedDiTMode;
  const auto x = torch::zeros({2, 3, 8}), w = torch::zeros({8, 8});
  EXPECT_EQ(mdd::detail::fused_dit_mode(x, w), FusedDiTMode::kNone) << "grad mode is on by default";
  {
    torch::NoGradGuard ng;
    EXPECT_EQ(mdd::detail::fused_dit_mode(x, w), FusedDiTMode::kFP32);
    EXPECT_EQ(mdd::detail::fused_dit_mode(x.to(torch::kFloat64), w), FusedDiTMode::kNone);
    EXPECT_EQ(mdd::detail::fused_dit_mode(x, w.to(torch::kBFloat16)), FusedDiTMode::kNone);
    mdd::AutocastGuard autocast(torch::kCPU, mdd::Precision::kBF16);
    EXPECT_EQ(mdd::detail::fused_dit_mode(x, w), FusedDiTMode::kBF16);
  }
  auto model = small_model();
  mdd::load_state_dict(*model, golden("dit_small.weights.safetensors"), /*strict=*/true);
  model->eval();
  const auto io = golden("dit_small.io.safetensors");
  const auto ref = io.at("out");
  const double scale = ref.abs().max().item<double>();
  torch::NoGradGuard ng;
  torch::Tensor out16;
  {
    mdd::AutocastGuard autocast(torch::kCPU, mdd::Precision::kBF16);
    out16 = model->forward(io.at("x"), io.at("t"), io.at("y"));
  }
  EXPECT_EQ(out16.scalar_type(), torch::kBFloat16) << "as the module path's under autocast";
  const double max_err = mdd_test::max_abs_diff(out16.to(torch::kFloat32), ref);
  EXPECT_LE(max_err, 0.03 * scale) << "max err " << max_err << " scale " << scale;
  EXPECT_GT(max_err, 0.0) << "bf16 changed nothing: did it run?";
  RecordProperty("dit_small/out_fused_bf16", fmt_err(max_err, 0.03 * scale));
}

namespace {
// Random DiT-shaped inputs; the generator keeps them the same in every run.
torch::Tensor rnd(std::vector<int64_t> shape, uint64_t seed, double sd = 1.0) {
  auto g = at::detail::createCPUGenerator(seed);
  return torch::randn(shape, g) * sd;
}
}  // namespace

TEST(DiTFused, ExpApproxAndBf16RoundingMatchReference) {
  double worst = 0;
  for (double v = -87.0; v <= 88.0; v += 0.0137) {
    const float x = static_cast<float>(v);
    const double ref = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::abs(mdd::detail::exp_approx(x) - ref) / ref);
  }
  EXPECT_LT(worst, 5e-7) << "relative error of exp_approx";
  EXPECT_EQ(mdd::detail::exp_approx(-1000.0F), mdd::detail::exp_approx(-87.0F));
  EXPECT_TRUE(std::isfinite(mdd::detail::exp_approx(1000.0F)));
  // float -> bf16 rounding: every value the same as c10::BFloat16's, NaN stays NaN.
  const auto vals = rnd({4096}, 5, 30.0);
  for (int64_t i = 0; i < vals.numel(); ++i) {
    const float f = vals[i].item<float>();
    EXPECT_EQ(mdd::detail::float_to_bf16_bits(f), c10::BFloat16(f).x) << f;
  }
  const float nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(std::isnan(mdd::detail::bf16_bits_to_float(mdd::detail::float_to_bf16_bits(nan))));
}

TEST(DiTFused, KernelsMatchTheModuleOps) {
  const int64_t B = 3, N = 49, D = 96, H = 4;
  const auto x = rnd({B, N, D}, 1, 2.0) + 0.5;
  const auto mod = rnd({B, 6 * D}, 2, 0.3);
  const auto shift = mod.narrow(1, 0, D), scale = mod.narrow(1, D, D);  // strided rows, as in the block
  const auto ref_ln = torch::layer_norm(x, {D}, {}, {}, 1e-6) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1);
  EXPECT_TRUE(AllClose(mdd::detail::ln_modulate(x, shift, scale, 1e-6, torch::kFloat32), ref_ln, 2e-5));
  // bf16 output: the float result rounded once.
  EXPECT_TRUE(torch::equal(mdd::detail::ln_modulate(x, shift, scale, 1e-6, torch::kBFloat16),
                           mdd::detail::ln_modulate(x, shift, scale, 1e-6, torch::kFloat32).to(torch::kBFloat16)) ||
              AllClose(mdd::detail::ln_modulate(x, shift, scale, 1e-6, torch::kBFloat16).to(torch::kFloat32), ref_ln,
                       0.02));

  // GELU over a wide range, including where tanh saturates.
  auto h = torch::linspace(-12, 12, 20001);
  const auto ref_gelu = torch::gelu(h, "tanh");
  auto got = mdd::detail::gelu_tanh_(h.clone());
  // Absolute error against 1 + |x| (PyTorch returns exactly 0 below x = -5.06, where 1 + tanh(u)
  // rounds to 0; the exp form gives the true value there, ~1e-7).
  EXPECT_LT(((got - ref_gelu).abs() / (h.abs() + 1)).max().item<double>(), 1e-6);
  auto h16 = h.to(torch::kBFloat16);
  const auto ref16 = torch::gelu(h16.to(torch::kFloat32), "tanh");
  const auto got16 = mdd::detail::gelu_tanh_(h16.clone()).to(torch::kFloat32);
  EXPECT_LE((got16 - ref16).abs().max().item<double>(), 0.008 * 12) << "one bf16 rounding";
  // With the producing product's bias folded in: gelu(h + bias) per column, one rounding in bf16.
  const auto hb = rnd({37, 24}, 21, 3.0), bias_g = rnd({24}, 22, 0.5);
  EXPECT_TRUE(AllClose(mdd::detail::gelu_tanh_(hb.clone(), bias_g), torch::gelu(hb + bias_g, "tanh"), 2e-6));
  EXPECT_LE((mdd::detail::gelu_tanh_(hb.to(torch::kBFloat16), bias_g).to(torch::kFloat32) -
             torch::gelu(hb.to(torch::kBFloat16).to(torch::kFloat32) + bias_g, "tanh"))
                .abs().max().item<double>(),
            0.008 * 12);
  EXPECT_THROW(mdd::detail::gelu_tanh_(hb.clone(), bias_g.narrow(0, 0, 23)), mdd::Error);

  // Attention with DiffFit gammas, against softmax(q k^T / sqrt(hd)) v on the module's layout.
  const auto qkv = rnd({B, N, 3 * D}, 3, 1.5);
  const auto gamma = 1 + rnd({3 * D}, 4, 0.2);
  auto ref_attn = [&](const torch::Tensor& qkv_f, const torch::Tensor& g) {
    auto p = (g.defined() ? qkv_f * g : qkv_f).reshape({B, N, 3, H, D / H}).permute({2, 0, 3, 1, 4});
    auto s = torch::matmul(p[0], p[1].transpose(-2, -1)) / std::sqrt(double(D / H));
    return torch::matmul(s.softmax(-1), p[2]).transpose(1, 2).reshape({B, N, D});
  };
  EXPECT_TRUE(AllClose(mdd::detail::attention_from_qkv(qkv, H, gamma), ref_attn(qkv, gamma), 2e-5));
  EXPECT_TRUE(AllClose(mdd::detail::attention_from_qkv(qkv, H, torch::Tensor()),
                       ref_attn(qkv, torch::Tensor()), 2e-5));
  const auto bias_qkv = rnd({3 * D}, 23, 0.5);
  EXPECT_TRUE(AllClose(mdd::detail::attention_from_qkv(qkv, H, gamma, bias_qkv), ref_attn(qkv + bias_qkv, gamma), 2e-5));
  EXPECT_THROW(mdd::detail::attention_from_qkv(qkv, H, gamma, bias_qkv.narrow(0, 0, D)), mdd::Error);
  // bf16 qkv: the float32-math kernel rounds only its output; the bf16 dot-product kernel (where
  // the CPU has one) rounds q, k, v and the probabilities as bf16 autocast matmuls do, and must
  // stay within the error of the module ops under bf16 autocast (which also round the scores).
  const auto qkv16 = qkv.to(torch::kBFloat16);
  const auto ref_a16 = ref_attn(qkv16.to(torch::kFloat32), gamma);
  const bool prev = mdd::detail::set_bf16_dot_attention(false);
  const auto a16 = mdd::detail::attention_from_qkv(qkv16, H, gamma);
  mdd::detail::set_bf16_dot_attention(true);
  ASSERT_EQ(a16.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(AllClose(a16.to(torch::kFloat32), ref_a16, 0.02));
  // Shapes: the demo's (49 tokens, odd: a half-filled last key pair; head dim 24: a half-empty
  // column block), DiT-S/2's (256 tokens, head dim 64), one and two tokens, a ragged row block.
  struct Shape { int64_t B, N, D, H; };
  for (const Shape sh : {Shape{B, N, D, H}, Shape{2, 256, 384, 6}, Shape{2, 1, 96, 4}, Shape{3, 2, 32, 2},
                         Shape{2, 7, 64, 1}}) {
    const auto q3 = rnd({sh.B, sh.N, 3 * sh.D}, 30 + sh.N, 1.5).to(torch::kBFloat16);
    const auto gm = 1 + rnd({3 * sh.D}, 31, 0.2), bs = rnd({3 * sh.D}, 32, 0.5);
    const auto in = q3.to(torch::kFloat32) + bs;
    auto p = (in * gm).reshape({sh.B, sh.N, 3, sh.H, sh.D / sh.H}).permute({2, 0, 3, 1, 4});
    const double sc = 1.0 / std::sqrt(double(sh.D / sh.H));
    const auto ref = torch::matmul((torch::matmul(p[0], p[1].transpose(-2, -1)) * sc).softmax(-1), p[2])
                         .transpose(1, 2).reshape({sh.B, sh.N, sh.D});
    torch::Tensor module16;
    {
      mdd::AutocastGuard autocast(torch::kCPU, mdd::Precision::kBF16);
      auto pm = (in.to(torch::kBFloat16) * gm).reshape({sh.B, sh.N, 3, sh.H, sh.D / sh.H}).permute({2, 0, 3, 1, 4});
      module16 = torch::matmul(torch::matmul(pm[0] * sc, pm[1].transpose(-2, -1)).softmax(-1), pm[2])
                     .transpose(1, 2).reshape({sh.B, sh.N, sh.D});
    }
    const double scale = ref.abs().max().item<double>();
    const double err_module = mdd_test::max_abs_diff(module16.to(torch::kFloat32), ref);
    mdd::detail::set_bf16_dot_attention(true);
    const auto dot16 = mdd::detail::attention_from_qkv(q3, sh.H, gm, bs);
    mdd::detail::set_bf16_dot_attention(false);
    const auto float16 = mdd::detail::attention_from_qkv(q3, sh.H, gm, bs);
    const double err_dot = mdd_test::max_abs_diff(dot16.to(torch::kFloat32), ref);
    const double err_float = mdd_test::max_abs_diff(float16.to(torch::kFloat32), ref);
    const std::string what = "N " + std::to_string(sh.N) + " D " + std::to_string(sh.D) + ": dot " +
                             std::to_string(err_dot) + " float " + std::to_string(err_float) + " module " +
                             std::to_string(err_module);
    EXPECT_LE(err_dot, std::max(err_module, 0.01 * scale)) << what;
    EXPECT_LE(err_float, std::max(err_module, 0.01 * scale)) << what;
    if (mdd::detail::bf16_dot_attention_available() && sh.N > 1) {
      EXPECT_FALSE(torch::equal(dot16, float16)) << "the dot-product kernel did not run: " << what;
    }
  }
  mdd::detail::set_bf16_dot_attention(prev);
  // One token: the output is v itself.
  const auto one = rnd({2, 1, 3 * D}, 6);
  EXPECT_TRUE(AllClose(mdd::detail::attention_from_qkv(one, H, torch::Tensor()), one.narrow(2, 2 * D, D),
                       1e-6));

  // Gated residual with both gammas, and with none.
  const auto a = rnd({B, N, D}, 7), g1 = 1 + rnd({D}, 8, 0.1), g2 = 1 + rnd({D}, 9, 0.1);
  const auto gate = mod.narrow(1, 2 * D, D);
  EXPECT_TRUE(AllClose(mdd::detail::gated_residual(x, gate, g1, a, g2), x + g1 * gate.unsqueeze(1) * (g2 * a), 1e-6));
  const auto bias_r = rnd({D}, 24, 0.5);
  EXPECT_TRUE(AllClose(mdd::detail::gated_residual(x, gate, g1, a, g2, bias_r),
                       x + g1 * gate.unsqueeze(1) * (g2 * (a + bias_r)), 1e-6));
  EXPECT_TRUE(AllClose(mdd::detail::gated_residual(x, gate, torch::Tensor(), a.to(torch::kBFloat16), torch::Tensor()),
                       x + gate.unsqueeze(1) * a.to(torch::kBFloat16).to(torch::kFloat32), 1e-6));
  // Wrong shapes are errors, not reads out of bounds.
  EXPECT_THROW(mdd::detail::gated_residual(x, gate.narrow(0, 0, 2), g1, a, g2), mdd::Error);
  EXPECT_THROW(mdd::detail::attention_from_qkv(qkv.narrow(2, 0, 3 * D - 3), H, gamma), mdd::Error);
  EXPECT_THROW(mdd::detail::ln_modulate(x, shift.narrow(1, 0, D - 1), scale, 1e-6, torch::kFloat32), mdd::Error);
}

// A DiT-S/2-shaped block with random (non-zero adaLN) weights and DiffFit gammas: fused vs module
// path, float32 and bf16 autocast, and a model cloned from a fused one keeps the setting.
TEST(DiTFused, RandomWideBlockMatchesModulePath) {
  torch::manual_seed(11);
  auto block = mdd::DiTBlock(384, 6, 4.0);
  block->enable_gammas();
  {
    torch::NoGradGuard ng;
    for (auto& p : block->parameters()) p.copy_(rnd(p.sizes().vec(), 12 + p.numel() % 97, 0.05) + (p.dim() == 1 ? 1.0 : 0.0));
  }
  const auto x = rnd({2, 256, 384}, 13), c = rnd({2, 384}, 14);
  torch::NoGradGuard ng;
  block->set_fused(false);
  const auto ref = block->forward(x, c);
  block->set_fused(true);
  const auto out = block->forward(x, c);
  const double scale = (ref - x).abs().max().item<double>();
  EXPECT_LE(mdd_test::max_abs_diff(out, ref), 2e-5 * std::max(1.0, scale));
  torch::Tensor out16, ref16;
  {
    mdd::AutocastGuard autocast(torch::kCPU, mdd::Precision::kBF16);
    out16 = block->forward(x, c);
    block->set_fused(false);
    ref16 = block->forward(x, c);
    block->set_fused(true);
  }
  EXPECT_EQ(out16.scalar_type(), torch::kFloat32) << "the residual stream stays float32";
  const double err16 = mdd_test::max_abs_diff(out16, ref), err_mod16 = mdd_test::max_abs_diff(ref16.to(torch::kFloat32), ref);
  EXPECT_GT(err16, 0.0);
  // No worse than the module path under the same autocast (plus slack for a different rounding).
  EXPECT_LE(err16, 1.5 * err_mod16 + 1e-3 * scale) << "fused bf16 " << err16 << " module bf16 " << err_mod16;
  auto copy = std::dynamic_pointer_cast<mdd::DiTBlockImpl>(block->clone());
  EXPECT_TRUE(copy->fused());
  block->set_fused(false);
  EXPECT_FALSE(std::dynamic_pointer_cast<mdd::DiTBlockImpl>(block->clone())->fused());
}

// ---- training path: the fused autograd functions against autograd through the ATen ops.

namespace {
// max |a - b| relative to the largest |b| (gradients span many scales).
double rel_err(const torch::Tensor& a, const torch::Tensor& b) {
  return mdd_test::max_abs_diff(a, b) / std::max(1e-12, b.abs().max().item<double>());
}

// Gradients of sum(out * w) with respect to `inputs` (w: a fixed random upstream gradient).
std::vector<torch::Tensor> grads_of(const torch::Tensor& out, const std::vector<torch::Tensor>& inputs, uint64_t seed) {
  const auto w = rnd(out.sizes().vec(), seed).to(out.scalar_type());
  auto g = torch::autograd::grad({out}, inputs, {w}, /*retain_graph=*/false, /*create_graph=*/false,
                                 /*allow_unused=*/true);
  return g;
}

std::vector<torch::Tensor> leaves(const std::vector<torch::Tensor>& ts) {
  std::vector<torch::Tensor> out;
  for (const auto& t : ts) out.push_back(t.detach().clone().requires_grad_(true));
  return out;
}
}  // namespace

TEST(DiTFusedTrain, KernelGradientsMatchAutograd) {
  const int64_t B = 3, N = 49, D = 96, H = 4;
  {  // LayerNorm + modulate, strided shift/scale rows as in the block
    auto in = leaves({rnd({B, N, D}, 1, 2.0) + 0.5, rnd({B, 6 * D}, 2, 0.3)});
    auto in_ref = leaves({in[0], in[1]});
    const auto y = mdd::detail::ln_modulate_train(in[0], in[1].narrow(1, 0, D), in[1].narrow(1, D, D), 1e-6, false);
    const auto sh = in_ref[1].narrow(1, 0, D), sc = in_ref[1].narrow(1, D, D);
    const auto ref = torch::layer_norm(in_ref[0], {D}, {}, {}, 1e-6) * (1 + sc.unsqueeze(1)) + sh.unsqueeze(1);
    EXPECT_LT(rel_err(y, ref), 2e-6);
    const auto g = grads_of(y, in, 20), gr = grads_of(ref, in_ref, 20);
    EXPECT_LT(rel_err(g[0], gr[0]), 2e-5) << "dx";
    EXPECT_LT(rel_err(g[1], gr[1]), 2e-5) << "dshift, dscale";
    EXPECT_EQ(g[1].narrow(1, 2 * D, 4 * D).abs().max().item<double>(), 0.0) << "only the rows it read";
    // bf16 output with a bf16 upstream gradient: close to the float gradients.
    auto in16 = leaves({in[0], in[1]});
    const auto y16 = mdd::detail::ln_modulate_train(in16[0], in16[1].narrow(1, 0, D), in16[1].narrow(1, D, D), 1e-6, true);
    ASSERT_EQ(y16.scalar_type(), torch::kBFloat16);
    const auto g16 = grads_of(y16, in16, 20);
    EXPECT_LT(rel_err(g16[0], gr[0]), 0.02);
    EXPECT_LT(rel_err(g16[1], gr[1]), 0.02);
  }
  {  // gated residual with both gammas; then without gammas and a bf16 branch
    auto in = leaves({rnd({B, N, D}, 3), rnd({B, 6 * D}, 4, 0.3), 1 + rnd({D}, 5, 0.1), rnd({B, N, D}, 6),
                      1 + rnd({D}, 7, 0.1)});
    auto in_ref = leaves(in);
    const auto y = mdd::detail::gated_residual_train(in[0], in[1].narrow(1, 2 * D, D), in[2], in[3], in[4]);
    const auto ref = in_ref[0] + in_ref[2] * in_ref[1].narrow(1, 2 * D, D).unsqueeze(1) * (in_ref[4] * in_ref[3]);
    EXPECT_LT(rel_err(y, ref), 1e-6);
    const auto g = grads_of(y, in, 21), gr = grads_of(ref, in_ref, 21);
    const char* names[] = {"dx", "dgate", "douter", "da", "dinner"};
    for (size_t i = 0; i < g.size(); ++i) EXPECT_LT(rel_err(g[i], gr[i]), 2e-6) << names[i];
    auto a16 = in[3].detach().to(torch::kBFloat16).requires_grad_(true);
    auto x2 = in[0].detach().clone().requires_grad_(true);
    const auto y16 = mdd::detail::gated_residual_train(x2, in[1].narrow(1, 2 * D, D), torch::Tensor(), a16, torch::Tensor());
    const auto g16 = grads_of(y16, {x2, a16}, 22);
    ASSERT_EQ(g16[1].scalar_type(), torch::kBFloat16) << "a's gradient in a's dtype";
    const auto ref_da = rnd({B, N, D}, 22) * in[1].detach().narrow(1, 2 * D, D).unsqueeze(1);
    EXPECT_LT(rel_err(g16[1].to(torch::kFloat32), ref_da), 0.01);
  }
  {  // GELU over a wide range
    auto h = torch::linspace(-8, 8, 4001).requires_grad_(true);
    auto h_ref = h.detach().clone().requires_grad_(true);
    const auto y = mdd::detail::gelu_tanh_train(h);
    const auto ref = torch::gelu(h_ref, "tanh");
    EXPECT_LT(((y - ref).abs() / (h_ref.abs() + 1)).max().item<double>(), 1e-6);
    const auto g = grads_of(y, {h}, 23)[0], gr = grads_of(ref, {h_ref}, 23)[0];
    EXPECT_LT(mdd_test::max_abs_diff(g, gr), 2e-5 * std::max(1.0, gr.abs().max().item<double>()));
    auto h16 = h.detach().to(torch::kBFloat16).requires_grad_(true);
    const auto g16 = grads_of(mdd::detail::gelu_tanh_train(h16), {h16}, 23)[0];
    ASSERT_EQ(g16.scalar_type(), torch::kBFloat16);
    EXPECT_LT(rel_err(g16.to(torch::kFloat32), gr), 0.05);
  }
  // Attention: the demo's shape (head_dim 24, 49 tokens: both padded), and a tiny one (5 tokens,
  // head_dim 16), with and without gamma.
  for (auto [b, n, d, heads] : {std::array<int64_t, 4>{B, N, D, H}, std::array<int64_t, 4>{2, 5, 32, 2}}) {
    for (bool with_gamma : {true, false}) {
      auto in = leaves({rnd({b, n, 3 * d}, 8, 1.5), 1 + rnd({3 * d}, 9, 0.2)});
      auto in_ref = leaves(in);
      const auto gamma = with_gamma ? in[1] : torch::Tensor();
      const auto y = mdd::detail::attention_train(in[0], heads, gamma);
      auto p = (with_gamma ? in_ref[0] * in_ref[1] : in_ref[0]).reshape({b, n, 3, heads, d / heads}).permute({2, 0, 3, 1, 4});
      auto s = torch::matmul(p[0], p[1].transpose(-2, -1)) / std::sqrt(double(d / heads));
      const auto ref = torch::matmul(s.softmax(-1), p[2]).transpose(1, 2).reshape({b, n, d});
      EXPECT_LT(rel_err(y, ref), 2e-6);
      const auto g = grads_of(y, in, 24), gr = grads_of(ref, in_ref, 24);
      EXPECT_LT(rel_err(g[0], gr[0]), 2e-5) << "dqkv, tokens " << n;
      if (with_gamma) {
        EXPECT_LT(rel_err(g[1], gr[1]), 2e-5) << "dgamma, tokens " << n;
      } else {
        EXPECT_FALSE(g[1].defined());
      }
      auto q16 = in[0].detach().to(torch::kBFloat16).requires_grad_(true);
      const auto g16 = grads_of(mdd::detail::attention_train(q16, heads, gamma.defined() ? gamma.detach() : gamma), {q16}, 24)[0];
      ASSERT_EQ(g16.scalar_type(), torch::kBFloat16);
      EXPECT_LT(rel_err(g16.to(torch::kFloat32), gr[0]), 0.05) << "bf16 dqkv, tokens " << n;
    }
  }
}

// A DiffFit block with random weights: forward and every gradient (input, conditioning, all
// parameters) through the fused training path against the module path, float32 and bf16.
TEST(DiTFusedTrain, BlockAndFinalLayerGradientsMatchModulePath) {
  // 260 tokens: long enough that the block keeps the module's attention (see fused_dit.cpp).
  for (auto [D, H, N] : {std::array<int64_t, 3>{96, 4, 49}, std::array<int64_t, 3>{128, 2, 64},
                         std::array<int64_t, 3>{32, 2, 260}}) {
    auto block = mdd::DiTBlock(D, H, 4.0);
    block->enable_gammas();
    auto final_layer = mdd::FinalLayer(D, 2, 2);
    {
      torch::NoGradGuard ng;
      uint64_t seed = 30;
      for (auto& p : block->parameters()) p.copy_(rnd(p.sizes().vec(), seed++, 0.05) + (p.dim() == 1 ? 1.0 : 0.0));
      for (auto& p : final_layer->parameters()) p.copy_(rnd(p.sizes().vec(), seed++, 0.05));
    }
    auto params = block->parameters();
    for (auto& p : final_layer->parameters()) params.push_back(p);
    auto run = [&](bool fused, bool bf16) {
      block->set_fused(fused);
      final_layer->set_fused(fused);
      auto x = rnd({3, N, D}, 50).requires_grad_(true);
      auto c = rnd({3, D}, 51).requires_grad_(true);
      torch::Tensor out;
      {
        mdd::AutocastGuard ac(torch::kCPU, bf16 ? mdd::Precision::kBF16 : mdd::Precision::kFP32);
        out = final_layer->forward(block->forward(x, c), c).to(torch::kFloat32);
      }
      std::vector<torch::Tensor> wrt{x, c};
      wrt.insert(wrt.end(), params.begin(), params.end());
      auto g = grads_of(out, wrt, 52);
      g.insert(g.begin(), out.detach());
      return g;
    };
    const auto ref = run(false, false), got = run(true, false);
    for (size_t i = 0; i < ref.size(); ++i) EXPECT_LT(rel_err(got[i], ref[i]), 5e-5) << "D " << D << " tensor " << i;
    const auto ref16 = run(false, true), got16 = run(true, true);
    for (size_t i = 0; i < ref.size(); ++i) {
      // No further from float32 than the module path under the same autocast, with slack.
      const double e16 = rel_err(got16[i], ref[i]), m16 = rel_err(ref16[i], ref[i]);
      EXPECT_LT(e16, 2.0 * m16 + 0.01) << "D " << D << " tensor " << i << " fused " << e16 << " module " << m16;
    }
  }
}

TEST(DiTFusedTrain, DoubleBackwardIsRefused) {
  auto block = mdd::DiTBlock(32, 2, 4.0);
  auto x = rnd({2, 5, 32}, 60).requires_grad_(true);
  const auto c = rnd({2, 32}, 61);
  const auto out = block->forward(x, c).square().sum();
#if MDD_TORCH_AT_LEAST(2, 0)
  EXPECT_THROW(torch::autograd::grad({out}, {x}, {}, /*retain_graph=*/true, /*create_graph=*/true), mdd::Error);
#endif
  // A plain backward works, and fused(false) gives the module path's differentiable graph.
  EXPECT_NO_THROW(torch::autograd::grad({out}, {x}));
  block->set_fused(false);
  const auto out2 = block->forward(x, c).square().sum();
  const auto gx = torch::autograd::grad({out2}, {x}, {}, true, true)[0];
  EXPECT_TRUE(gx.requires_grad());
#if !MDD_TORCH_AT_LEAST(2, 0)
  GTEST_SKIP() << "LibTorch 1.13 runs custom backward functions with grad mode off even under create_graph, so "
                  "the fused kernels cannot detect (and refuse) a double backward there";
#endif
}

TEST(DiTFusedTrain, ModeSelection) {
  const auto x = torch::zeros({1, 4, 8}), w = torch::zeros({8, 8});
  EXPECT_EQ(mdd::detail::fused_dit_train_mode(x, w), mdd::detail::FusedDiTMode::kFP32);
  {
    mdd::AutocastGuard ac(torch::kCPU, mdd::Precision::kBF16);
    EXPECT_EQ(mdd::detail::fused_dit_train_mode(x, w), mdd::detail::FusedDiTMode::kBF16);
  }
  {
    torch::NoGradGuard ng;
    EXPECT_EQ(mdd::detail::fused_dit_train_mode(x, w), mdd::detail::FusedDiTMode::kNone);
  }
  EXPECT_EQ(mdd::detail::fused_dit_train_mode(x.to(torch::kFloat64), w), mdd::detail::FusedDiTMode::kNone);
  EXPECT_EQ(mdd::detail::fused_dit_train_mode(x, w.to(torch::kBFloat16)), mdd::detail::FusedDiTMode::kNone);
}
