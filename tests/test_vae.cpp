// AutoencoderKL (diffusers SD VAE) parity with the golden fixtures, key names, loading, tiling,
// slicing, and the Codec adapters.
#include <filesystem>
#include <fstream>
#include <iostream>

#include <nlohmann/json.hpp>

#include "mdd/io/safetensors.h"
#include "mdd/io/state_dict.h"
#include "mdd/models/autoencoder_kl.h"
#include "mdd/models/codec.h"
#include "mdd/util/error.h"
#include "test_util.h"

namespace {

using mdd::AutoencoderKL;
using mdd::AutoencoderKLImpl;
using mdd::AutoencoderKLOptions;
using nlohmann::json;

json read_json(const std::string& name) {
  std::ifstream in(mdd_test::data_path(name));
  return json::parse(in);
}

const json& manifest() {
  static const json m = read_json("MANIFEST_vae_eval.json");
  return m;
}

/// numpy.allclose semantics, as the MANIFEST's tolerance_rule states: |a - b| <= atol + rtol * |b|.
::testing::AssertionResult AllCloseRel(const std::string& name, const torch::Tensor& actual,
                                       const torch::Tensor& expected, double atol, double rtol) {
  if (actual.sizes() != expected.sizes())
    return ::testing::AssertionFailure() << name << ": shape " << actual.sizes() << " != " << expected.sizes();
  const auto a = actual.detach().to(torch::kFloat64), b = expected.detach().to(torch::kFloat64);
  const auto excess = (a - b).abs() - (atol + rtol * b.abs());
  const double worst = excess.max().item<double>();
  const double max_abs = (a - b).abs().max().item<double>();
  std::cout << "  [" << name << "] max abs err " << max_abs << "\n";
  if (!(worst <= 0))
    return ::testing::AssertionFailure() << name << ": max abs err " << max_abs << " exceeds atol " << atol
                                         << " + rtol " << rtol << " * |ref|";
  return ::testing::AssertionSuccess();
}

AutoencoderKLOptions options_from_case(const json& cfg) {
  return AutoencoderKLOptions()
      .in_channels(cfg["in_channels"].get<int64_t>())
      .out_channels(cfg["out_channels"].get<int64_t>())
      .latent_channels(cfg["latent_channels"].get<int64_t>())
      .block_out_channels(cfg["block_out_channels"].get<std::vector<int64_t>>())
      .layers_per_block(cfg["layers_per_block"].get<int64_t>())
      .norm_num_groups(cfg["norm_num_groups"].get<int64_t>())
      .sample_size(cfg["sample_size"].get<int64_t>());
}

AutoencoderKL load_case(const std::string& case_name) {
  const json& c = manifest()["cases"][case_name];
  AutoencoderKL vae(options_from_case(c["config"]));
  const auto weights = mdd_test::golden(c["weights_file"].get<std::string>());
  mdd::load_state_dict(*vae, weights, /*strict=*/true);  // throws on any missing/unexpected key
  vae->eval();
  EXPECT_EQ(static_cast<int64_t>(mdd::state_dict(*vae).size()), static_cast<int64_t>(weights.size()));
  int64_t count = 0;
  for (const auto& p : vae->parameters()) count += p.numel();
  EXPECT_EQ(count, c["param_count"].get<int64_t>());
  return vae;
}

// Every tensor of a golden case: encode/decode outputs, posterior, the logvar clamp case and taps.
void check_golden_case(const std::string& case_name) {
  const json& c = manifest()["cases"][case_name];
  const double atol = c["suggested_tolerance"]["atol"].get<double>();
  const double rtol = c["suggested_tolerance"]["rtol"].get<double>();
  const auto io = mdd_test::golden(c["io_file"].get<std::string>());
  AutoencoderKL vae = load_case(case_name);
  torch::NoGradGuard no_grad;

  std::map<std::string, torch::Tensor> taps;
  vae->set_tap([&](const std::string& path, const torch::Tensor& out) {
    if (!taps.count(path)) taps[path] = out.narrow(0, 0, 1).clone();  // batch element 0, first call
  });
  const torch::Tensor x = io.at("x"), eps = io.at("eps"), z_in = io.at("z_in");
  const torch::Tensor moments = vae->moments(x);
  mdd::DiagonalGaussian post = vae->encode(x);
  const torch::Tensor dec_mean = vae->decode(post.mean);
  vae->set_tap({});

  std::map<std::string, torch::Tensor> got;
  got["moments"] = moments;
  got["latent_mean"] = post.mode();
  got["latent_logvar"] = post.logvar;
  got["latent_std"] = post.std();
  got["latent_sample"] = post.sample(eps);
  got["dit_latent"] = got["latent_sample"] * vae->options.scaling_factor();
  got["dit_decoded"] = vae->decode(got["dit_latent"] / vae->options.scaling_factor());
  got["dec_mean"] = dec_mean;
  got["dec_z_in"] = vae->decode(z_in);
  const auto dgd = mdd::DiagonalGaussian::from_moments(io.at("dgd.moments"));
  got["dgd.mean"] = dgd.mean;
  got["dgd.logvar"] = dgd.logvar;
  got["dgd.std"] = dgd.std();
  got["dgd.var"] = dgd.var();
  for (const auto& [path, t] : taps) got["tap." + path] = t;

  int checked = 0;
  for (const auto& [name, expected] : io) {
    if (name == "x" || name == "eps" || name == "z_in" || name == "dgd.moments") continue;
    ASSERT_TRUE(got.count(name)) << case_name << ": no output computed for golden tensor " << name;
    EXPECT_TRUE(AllCloseRel(case_name + "/" + name, got.at(name), expected, atol, rtol));
    ++checked;
  }
  // Every tensor listed in the MANIFEST shapes must have been compared.
  for (const auto& [name, shape] : c["shapes"].items()) {
    if (name == "x" || name == "eps" || name == "z_in" || name == "dgd.moments") continue;
    EXPECT_TRUE(io.count(name)) << "golden file lacks " << name;
  }
  EXPECT_GE(checked, 10);
  // The clamp case really hits both bounds.
  EXPECT_EQ(dgd.logvar.max().item<double>(), 20.0);
  EXPECT_EQ(dgd.logvar.min().item<double>(), -30.0);
}

TEST(Vae, GoldenTiny) { check_golden_case("vae_tiny"); }
TEST(Vae, GoldenTinyLayersPerBlock2) { check_golden_case("vae_tiny_lpb2"); }

TEST(Vae, DefaultArchitectureMatchesRealKeyList) {
  const json keys = read_json("vae_keys.json");
  AutoencoderKL vae;
  const auto sd = mdd::state_dict(*vae);
  const auto& expected = keys["state_dict_new"];
  ASSERT_EQ(sd.size(), expected.size());
  EXPECT_EQ(static_cast<int64_t>(sd.size()), keys["state_dict_entries"].get<int64_t>());
  EXPECT_EQ(sd.size(), 248u);
  for (const auto& entry : expected) {
    const auto name = entry[0].get<std::string>();
    const auto shape = entry[1].get<std::vector<int64_t>>();
    ASSERT_TRUE(sd.count(name)) << "missing key " << name;
    EXPECT_EQ(sd.at(name).sizes().vec(), shape) << name;
  }
  int64_t count = 0;
  for (const auto& p : vae->parameters()) count += p.numel();
  EXPECT_EQ(count, keys["param_count"].get<int64_t>());
  EXPECT_EQ(count, 83653863);
  EXPECT_EQ(vae->buffers().size(), 0u);
  EXPECT_DOUBLE_EQ(vae->options.scaling_factor(), keys["scaling_factor"].get<double>());
  EXPECT_EQ(vae->downsample_factor(), 8);
}

TEST(Vae, OldKeyListNormalizesToNewKeyList) {
  // The full real key list in diffusers <= 0.16 naming maps exactly onto the current one.
  const json keys = read_json("vae_keys.json");
  mdd::io::TensorMap old_weights;
  for (const auto& entry : keys["state_dict_old_order_v0.14"])
    old_weights[entry[0].get<std::string>()] =
        torch::empty(entry[1].get<std::vector<int64_t>>());  // never touched
  std::set<std::string> expected;
  for (const auto& entry : keys["state_dict_new"]) expected.insert(entry[0].get<std::string>());
  const auto normalized = AutoencoderKLImpl::normalize_keys(old_weights);
  std::set<std::string> got;
  for (const auto& kv : normalized) got.insert(kv.first);
  EXPECT_EQ(got, expected);
}

// Renames current attention names to diffusers' old ones (optionally as 1x1 conv weights).
mdd::io::TensorMap to_old_names(const mdd::io::TensorMap& w, bool conv_shaped) {
  const std::vector<std::pair<std::string, std::string>> map = {
      {".to_q.", ".query."}, {".to_k.", ".key."}, {".to_v.", ".value."}, {".to_out.0.", ".proj_attn."}};
  mdd::io::TensorMap out;
  int renamed = 0;
  for (const auto& [k, t] : w) {
    std::string nk = k;
    torch::Tensor nt = t;
    for (const auto& [from, to] : map) {
      const auto pos = nk.find(from);
      if (pos != std::string::npos) {
        nk = nk.substr(0, pos) + to + nk.substr(pos + from.size());
        if (conv_shaped && t.dim() == 2) nt = t.reshape({t.size(0), t.size(1), 1, 1});
        ++renamed;
      }
    }
    out[nk] = nt;
  }
  EXPECT_EQ(renamed, 16);  // 2 attentions x 4 projections x (weight, bias)
  return out;
}

TEST(Vae, OldAttentionNamesLoadStrictlyAfterNormalize) {
  const json& c = manifest()["cases"]["vae_tiny"];
  const auto weights = mdd_test::golden("vae_tiny.weights.safetensors");
  const auto io = mdd_test::golden("vae_tiny.io.safetensors");
  for (bool conv_shaped : {false, true}) {
    const auto old = to_old_names(weights, conv_shaped);
    AutoencoderKL vae(options_from_case(c["config"]));
    // Without normalisation a strict load must fail (old names are unexpected).
    EXPECT_THROW(mdd::load_state_dict(*vae, old, true), mdd::Error);
    mdd::load_state_dict(*vae, AutoencoderKLImpl::normalize_keys(old), /*strict=*/true);
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(AllCloseRel("old_names/dec_z_in", vae->decode(io.at("z_in")), io.at("dec_z_in"), 1e-4, 1e-4));
    EXPECT_TRUE(AllCloseRel("old_names/latent_mean", vae->encode(io.at("x")).mean, io.at("latent_mean"), 1e-4, 1e-4));
  }
  // Current names pass through untouched.
  const auto same = AutoencoderKLImpl::normalize_keys(weights);
  ASSERT_EQ(same.size(), weights.size());
  for (const auto& [k, t] : weights) EXPECT_TRUE(same.count(k) && same.at(k).equal(t)) << k;
  // Old and new names for the same tensor collide.
  auto mixed = weights;
  mixed["encoder.mid_block.attentions.0.query.weight"] = weights.at("encoder.mid_block.attentions.0.to_q.weight");
  EXPECT_THROW(AutoencoderKLImpl::normalize_keys(mixed), mdd::Error);
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

TEST(Vae, FromPretrainedFolder) {
  const json& c = manifest()["cases"]["vae_tiny"];
  const std::string dir = mdd_test::tmp_dir("vae_from_pretrained");
  json cfg = c["config"];
  cfg["_class_name"] = "AutoencoderKL";
  cfg["_diffusers_version"] = "0.4.2";
  cfg["act_fn"] = "silu";
  write_text(dir + "/config.json", cfg.dump(2));
  // Save in the OLD naming (as the hub's sd-vae-ft-* files are) to exercise normalisation.
  const auto weights = mdd_test::golden("vae_tiny.weights.safetensors");
  mdd::io::save_safetensors(dir + "/diffusion_pytorch_model.safetensors", to_old_names(weights, false));

  AutoencoderKL vae = AutoencoderKL::from_pretrained(dir);
  EXPECT_EQ(vae->options.block_out_channels(), (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(vae->options.norm_num_groups(), 16);
  EXPECT_DOUBLE_EQ(vae->options.scaling_factor(), 0.18215);
  const auto io = mdd_test::golden("vae_tiny.io.safetensors");
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(AllCloseRel("from_pretrained/dec_mean", vae->decode(vae->encode(io.at("x")).mean), io.at("dec_mean"),
                          1e-4, 1e-4));

  // The same folder with a torch.save `.bin` instead (how the hub ships sd-vae-ft-*: old names).
  // tests/data/vae_tiny_old_names.bin = torch.save(OrderedDict) of vae_tiny.weights.safetensors with
  // to_q/to_k/to_v/to_out.0 renamed to query/key/value/proj_attn (python3-torch 1.13, zip format).
  {
    const std::string bin_dir = mdd_test::tmp_dir("vae_from_pretrained_bin");
    write_text(bin_dir + "/config.json", cfg.dump(2));
    std::filesystem::copy_file(mdd_test::data_path("vae_tiny_old_names.bin"),
                               bin_dir + "/diffusion_pytorch_model.bin");
    AutoencoderKL vb = AutoencoderKL::from_pretrained(bin_dir);
    EXPECT_TRUE(AllCloseRel("from_pretrained_bin/dec_z_in", vb->decode(io.at("z_in")), io.at("dec_z_in"), 1e-4, 1e-4));
  }

  // Unsupported or unknown config entries throw an mdd::Error naming the key.
  auto expect_config_error = [&](json bad, const std::string& key) {
    write_text(dir + "/config.json", bad.dump());
    try {
      AutoencoderKL::from_pretrained(dir);
      ADD_FAILURE() << "no error for bad '" << key << "'";
    } catch (const mdd::Error& e) {
      EXPECT_NE(std::string(e.what()).find(key), std::string::npos) << e.what();
    }
  };
  json bad = cfg;
  bad["down_block_types"] = {"DownEncoderBlock2D", "AttnDownEncoderBlock2D"};
  expect_config_error(bad, "down_block_types");
  bad = cfg;
  bad["frobnicate"] = 3;
  expect_config_error(bad, "frobnicate");
  bad = cfg;
  bad["act_fn"] = "gelu";
  expect_config_error(bad, "act_fn");
  bad = cfg;
  bad["layers_per_block"] = "two";
  expect_config_error(bad, "layers_per_block");
  bad = cfg;
  bad["block_out_channels"] = {32, 64, 64};  // weights no longer fit: strict load names the keys
  write_text(dir + "/config.json", bad.dump());
  EXPECT_THROW(AutoencoderKL::from_pretrained(dir), mdd::Error);
  EXPECT_THROW(AutoencoderKL::from_pretrained(dir + "/nonexistent"), mdd::Error);
}

TEST(Vae, SlicingEqualsUnsliced) {
  torch::manual_seed(0);
  AutoencoderKL vae(AutoencoderKLOptions().block_out_channels({16, 32}).norm_num_groups(8).layers_per_block(1));
  vae->eval();
  torch::NoGradGuard no_grad;
  const torch::Tensor x = torch::rand({6, 3, 16, 16}) * 2 - 1;
  vae->runtime.slice_size(0);
  const auto full = vae->encode(x);
  const auto dec_full = vae->decode(full.mean);
  // Equal-size slices. On AVX-512 CPUs every sample went through the same kernels as in the full
  // batch (errors <= 1e-6); on an AVX2-only AMD EPYC oneDNN picks another convolution kernel for
  // batch 2 than for batch 6 (measured 2.1e-6 after the decoder): float rounding, so the same
  // 1e-5 bound as the remainder case below.
  vae->runtime.slice_size(2);
  EXPECT_TRUE(mdd_test::AllClose(vae->encode(x).mean, full.mean, 1e-5));
  EXPECT_TRUE(mdd_test::AllClose(vae->encode(x).logvar, full.logvar, 1e-5));
  EXPECT_TRUE(mdd_test::AllClose(vae->decode(full.mean), dec_full, 1e-5));
  // A remainder slice of ONE sample: LibTorch's CPU convolution picks a different kernel for batch 1
  // (measured ~7e-7 per conv on outputs of size ~2), which accumulates to a few 1e-6 after the
  // decoder's ~12 convolutions. That is float rounding, not a semantic difference: allow 1e-5.
  vae->runtime.slice_size(5);
  EXPECT_TRUE(mdd_test::AllClose(vae->encode(x).mean, full.mean, 1e-5));
  EXPECT_TRUE(mdd_test::AllClose(vae->decode(full.mean), dec_full, 1e-5));
}

// diffusers' tiled_decode written out naively (per-row loops, as in blend_v / blend_h), to check
// the library's vectorised implementation of the same algorithm.
torch::Tensor naive_tiled_decode(AutoencoderKL& vae, const torch::Tensor& z, int64_t T, int64_t O) {
  const int64_t f = vae->downsample_factor(), stride = T - O, extent = O * f, limit = (T - O) * f;
  std::vector<std::vector<torch::Tensor>> rows;
  for (int64_t i = 0; i < z.size(2); i += stride) {
    rows.emplace_back();
    for (int64_t j = 0; j < z.size(3); j += stride)
      rows.back().push_back(vae->decode_untiled(z.slice(2, i, i + T).slice(3, j, j + T)).clone());
  }
  std::vector<torch::Tensor> out_rows;
  for (size_t i = 0; i < rows.size(); ++i) {
    std::vector<torch::Tensor> out_row;
    for (size_t j = 0; j < rows[i].size(); ++j) {
      torch::Tensor& b = rows[i][j];
      if (i > 0) {
        const torch::Tensor& a = rows[i - 1][j];
        const int64_t e = std::min({a.size(2), b.size(2), extent});
        for (int64_t y = 0; y < e; ++y)
          b.select(2, y).copy_(a.select(2, a.size(2) - e + y) * (1 - double(y) / e) + b.select(2, y) * (double(y) / e));
      }
      if (j > 0) {
        const torch::Tensor& a = rows[i][j - 1];
        const int64_t e = std::min({a.size(3), b.size(3), extent});
        for (int64_t x = 0; x < e; ++x)
          b.select(3, x).copy_(a.select(3, a.size(3) - e + x) * (1 - double(x) / e) + b.select(3, x) * (double(x) / e));
      }
      out_row.push_back(b.slice(2, 0, limit).slice(3, 0, limit));
    }
    out_rows.push_back(torch::cat(out_row, 3));
  }
  return torch::cat(out_rows, 2);
}

// Tiled decode of a 64x64 latent. Tiling is an APPROXIMATION of the untiled decoder (diffusers says
// the same): each tile computes its own GroupNorm statistics and mid-block attention, so outputs
// differ everywhere, not just at seams. We therefore check (a) the tiling algorithm exactly against
// a naive re-implementation of diffusers' blend_v/blend_h, (b) a tile that covers the whole latent
// reproduces the untiled pass bit for bit, and (c) the approximation error against the untiled pass,
// with the tolerance explained below.
TEST(Vae, TiledDecodeApproximatesUntiled) {
  torch::manual_seed(1);
  // Three levels (factor 4) with few channels: 64x64 latent -> 256x256 image, fast on CPU.
  AutoencoderKL vae(AutoencoderKLOptions().block_out_channels({8, 16, 16}).norm_num_groups(4).layers_per_block(1));
  vae->eval();
  torch::NoGradGuard no_grad;
  // A statistically stationary latent (i.i.d. N(0,1), like the golden z_in), so per-tile statistics
  // estimate the global ones; the model has random weights.
  const torch::Tensor z = torch::randn({1, 4, 64, 64});
  vae->runtime.tiling(false);
  const torch::Tensor full = vae->decode(z);
  ASSERT_EQ(full.sizes(), (std::vector<int64_t>{1, 3, 256, 256}));

  // (b) One tile covering everything is exactly the untiled pass.
  vae->runtime.tiling(true).tile_latent_size(64).tile_overlap(16);
  EXPECT_TRUE(vae->decode(z).equal(full));

  // (a) diffusers' defaults (tile 32, overlap 8 -> 3x3 tiles) against the naive algorithm.
  vae->runtime.tiling(true).tile_latent_size(32).tile_overlap(8);
  const torch::Tensor tiled = vae->decode(z);
  ASSERT_EQ(tiled.sizes(), full.sizes());
  EXPECT_TRUE(mdd_test::AllClose(tiled, naive_tiled_decode(vae, z, 32, 8), 1e-6));

  // (c) Error against the untiled pass. Measured on this model: mean abs err 0.033 (14% of the mean
  // |output| 0.24), 99th percentile 0.16, max 0.57 (output max 2.3), and smaller with bigger tiles
  // (tile 48: mean 0.020). Tolerance: mean abs error <= 25% of the mean |output| and max error <=
  // 50% of the output range bound max|output|; a broken assembly (misplaced tile, missing or
  // reversed cross-fade, wrong crop) puts whole tiles out of place and exceeds both. Error must also
  // shrink as tiles grow, since the per-tile statistics approach the global ones.
  const double scale = full.abs().mean().item<double>();
  const double mean_err = (tiled - full).abs().mean().item<double>();
  const double max_err = (tiled - full).abs().max().item<double>();
  std::cout << "  tiled(32,8) vs untiled: mean |out| " << scale << ", mean abs err " << mean_err << ", max abs err "
            << max_err << "\n";
  EXPECT_LE(mean_err, 0.25 * scale);
  EXPECT_LE(max_err, 0.5 * full.abs().max().item<double>());
  vae->runtime.tile_latent_size(48).tile_overlap(12);
  const double mean_err48 = (vae->decode(z) - full).abs().mean().item<double>();
  std::cout << "  tiled(48,12) vs untiled: mean abs err " << mean_err48 << "\n";
  EXPECT_LT(mean_err48, mean_err);

  // Tiled encode (tiles of 32*4 = 128 px) gives the same latent shape and a close posterior mean.
  vae->runtime.tiling(false);
  const torch::Tensor img = torch::rand({1, 3, 256, 256}) * 2 - 1;
  const auto m_full = vae->encode(img);
  vae->runtime.tiling(true).tile_latent_size(32).tile_overlap(8);
  const auto m_tiled = vae->encode(img);
  ASSERT_EQ(m_tiled.mean.sizes(), m_full.mean.sizes());
  const double enc_scale = m_full.mean.abs().mean().item<double>();
  const double enc_err = (m_tiled.mean - m_full.mean).abs().mean().item<double>();
  std::cout << "  tiled encode: mean |mean| " << enc_scale << ", mean abs err " << enc_err << "\n";
  EXPECT_LE(enc_err, 0.25 * enc_scale);
}

// `clone()` is a deep copy: same keys and values, same outputs, and training the copy leaves the
// original untouched (what an EMA copy needs).
TEST(Vae, CloneIsAnIndependentDeepCopy) {
  torch::manual_seed(3);
  AutoencoderKL vae(AutoencoderKLOptions().block_out_channels({8, 16}).norm_num_groups(4).layers_per_block(2)
                        .in_channels(1).out_channels(1).latent_channels(2));
  vae->eval();
  AutoencoderKL copy(std::dynamic_pointer_cast<AutoencoderKLImpl>(vae->clone()));
  ASSERT_TRUE(copy);
  EXPECT_EQ(copy->options.block_out_channels(), vae->options.block_out_channels());
  const auto a = vae->named_parameters(), b = copy->named_parameters();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].key(), b[i].key());
    EXPECT_TRUE(torch::equal(a[i].value(), b[i].value())) << a[i].key();
    EXPECT_NE(a[i].value().data_ptr(), b[i].value().data_ptr()) << a[i].key();
  }
  const torch::Tensor x = torch::rand({2, 1, 8, 8}) * 2 - 1;
  torch::NoGradGuard ng;
  const torch::Tensor z = vae->encode(x).mean;
  EXPECT_TRUE(torch::equal(copy->encode(x).mean, z));
  EXPECT_TRUE(torch::equal(copy->decode(z), vae->decode(z)));
  for (auto& p : copy->parameters()) p.add_(1.0);
  EXPECT_TRUE(torch::equal(vae->encode(x).mean, z));  // the original did not move
  EXPECT_FALSE(torch::equal(copy->encode(x).mean, z));
}

TEST(Vae, BadInputsThrow) {
  AutoencoderKL vae(AutoencoderKLOptions().block_out_channels({16, 32}).norm_num_groups(8).layers_per_block(1));
  EXPECT_THROW(vae->encode(torch::zeros({1, 4, 16, 16})), mdd::Error);   // channels
  EXPECT_THROW(vae->encode(torch::zeros({1, 3, 15, 16})), mdd::Error);   // not a multiple of 2
  EXPECT_THROW(vae->encode(torch::zeros({3, 16, 16})), mdd::Error);      // rank
  EXPECT_THROW(vae->decode(torch::zeros({1, 3, 8, 8})), mdd::Error);     // latent channels
  EXPECT_THROW(vae->decode(torch::Tensor()), mdd::Error);
  vae->runtime.tiling(true).tile_latent_size(8).tile_overlap(8);
  EXPECT_THROW(vae->decode(torch::zeros({1, 4, 16, 16})), mdd::Error);  // overlap >= tile
  EXPECT_THROW(AutoencoderKL(AutoencoderKLOptions().block_out_channels({30, 64})), mdd::Error);  // groups
}

TEST(Codec, VaeCodecShapesAndScaling) {
  AutoencoderKL vae(AutoencoderKLOptions().block_out_channels({16, 32, 32, 32}).norm_num_groups(8).layers_per_block(1));
  mdd::VaeCodec codec(vae);
  EXPECT_DOUBLE_EQ(codec.scaling_factor(), 0.18215);
  EXPECT_EQ(codec.latent_shape({3, 256, 256}), (std::vector<int64_t>{4, 32, 32}));
  EXPECT_THROW(codec.latent_shape({3, 250, 256}), mdd::Error);
  const auto post = codec.encode(torch::zeros({2, 3, 32, 32}, torch::requires_grad()));
  EXPECT_EQ(post.mean.sizes(), (std::vector<int64_t>{2, 4, 4, 4}));
  EXPECT_FALSE(post.mean.requires_grad());  // the codec never records the frozen VAE
  EXPECT_EQ(codec.decode(post.mean).sizes(), (std::vector<int64_t>{2, 3, 32, 32}));
}

TEST(Codec, IdentityCodec) {
  mdd::IdentityCodec codec;
  const torch::Tensor x = torch::rand({2, 3, 8, 8}) * 2 - 1;
  const auto post = codec.encode(x);
  EXPECT_TRUE(post.mean.equal(x));
  EXPECT_TRUE(post.logvar.eq(-30).all().item<bool>());
  EXPECT_LT(post.std().max().item<double>(), 1e-6);
  torch::Tensor noise = torch::randn({2, 3, 8, 8});
  EXPECT_TRUE(mdd_test::AllClose(post.sample(noise), x, 1e-5));
  EXPECT_TRUE(codec.decode(x).equal(x));
  EXPECT_DOUBLE_EQ(codec.scaling_factor(), 1.0);
  EXPECT_EQ(codec.latent_shape({3, 28, 28}), (std::vector<int64_t>{3, 28, 28}));
  EXPECT_THROW(codec.encode(torch::zeros({3, 8, 8})), mdd::Error);
}

TEST(Codec, DiagonalGaussianSampling) {
  const auto g = mdd::DiagonalGaussian::from_moments(torch::cat({torch::zeros({1, 2, 3, 3}), torch::full({1, 2, 3, 3}, 100.0)}, 1));
  EXPECT_TRUE(g.logvar.eq(20).all().item<bool>());
  EXPECT_THROW(g.sample(torch::zeros({1, 2, 3})), mdd::Error);
  EXPECT_THROW(mdd::DiagonalGaussian::from_moments(torch::zeros({1, 3, 2, 2})), mdd::Error);
  auto gen1 = at::detail::createCPUGenerator(7), gen2 = at::detail::createCPUGenerator(7);
  EXPECT_TRUE(g.sample(gen1).equal(g.sample(gen2)));  // explicit generator -> reproducible
}

}  // namespace
