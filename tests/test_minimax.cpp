// Tests of the memory bank and the fused minimax loss: golden parity with the reference
// (MinimaxDiffusion train_dit.py:250-280, fixtures minimax_loss*), parity with the plain ATen
// composition (values and gradients), FIFO/ring behaviour, zero vectors and errors.
#include <fstream>
#include <iostream>
#include <set>

#include <nlohmann/json.hpp>

#include "mdd/minimax/memory_bank.h"
#include "mdd/minimax/minimax_loss.h"
#include "mdd/util/error.h"
#include "test_util.h"

namespace {

using mdd::MemoryBank;
using mdd::MinimaxLossOptions;
using mdd::minimax_loss;

const nlohmann::json& manifest() {
  static const nlohmann::json m = [] {
    std::ifstream f(mdd_test::data_path("MANIFEST.json"));
    return nlohmann::json::parse(f);
  }();
  return m;
}

// np.allclose(actual, expected, rtol, atol): |a - e| <= atol + rtol * |e| element-wise.
::testing::AssertionResult NpAllClose(const torch::Tensor& actual, const torch::Tensor& expected, double rtol,
                                      double atol) {
  if (actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure() << "shape " << actual.sizes() << " != expected " << expected.sizes();
  }
  if (actual.numel() == 0) return ::testing::AssertionSuccess();
  auto a = actual.detach().to(torch::kCPU, torch::kDouble);
  auto e = expected.detach().to(torch::kCPU, torch::kDouble);
  auto excess = ((a - e).abs() - (atol + rtol * e.abs())).max().item<double>();
  const double err = (a - e).abs().max().item<double>();
  if (!(excess <= 0)) {
    return ::testing::AssertionFailure() << "max abs err " << err << " exceeds atol " << atol << " + rtol " << rtol
                                         << " * |expected|";
  }
  return ::testing::AssertionSuccess() << "max abs err " << err;
}

torch::Tensor grad_of(const torch::Tensor& y, const torch::Tensor& x) {
  return torch::autograd::grad({y}, {x}, {}, /*retain_graph=*/true, /*create_graph=*/false, /*allow_unused=*/true)[0];
}

// Runs one golden case of kind minimax_loss: fills the banks from the fixture, runs the loss,
// compares terms/gradients/cosines/argmins, pushes like the reference and compares the banks.
void run_golden_case(const std::string& name) {
  const auto& c = manifest()["cases"][name];
  const auto io = mdd_test::golden(c["files"]["io"].get<std::string>());
  const auto& cfg = c["config"];
  const auto& tens = c["tensors"];
  const double rtol = c["tolerance"]["rtol"].get<double>();
  auto atol = [&](const std::string& key) { return tens[key]["suggested_atol"].get<double>(); };
  const double lr = cfg["lambda_pos"].get<double>(), ld = cfg["lambda_neg"].get<double>();
  const int64_t cap = cfg["memory_size"].get<int64_t>();
  const auto ry = io.at("ry");
  const int64_t num_classes = ry.max().item<int64_t>() + 1;

  MemoryBank real(num_classes, cap), gen(num_classes, cap);
  for (int64_t k = 0; k < num_classes; ++k) {
    const std::string rk = "real_memory.c" + std::to_string(k), gk = "pseudo_memory.c" + std::to_string(k);
    if (io.count(rk)) real.push(io.at(rk), torch::full({io.at(rk).size(0)}, k, torch::kLong));
    if (io.count(gk)) gen.push(io.at(gk), torch::full({io.at(gk).size(0)}, k, torch::kLong));
  }
  auto pred = io.at("pseudo_embeddings").clone().requires_grad_(true);
  auto terms = minimax_loss(pred, ry, real, gen, MinimaxLossOptions().lambda_r(lr).lambda_d(ld));
  // Compares one output against the fixture and logs the error against its MANIFEST tolerance.
  auto check = [&](const torch::Tensor& actual, const std::string& key, double rt) {
    auto r = NpAllClose(actual, io.at(key), rt, atol(key));
    EXPECT_TRUE(r) << name << " " << key;
    std::cout << "  " << name << " " << key << ": " << r.message() << " (atol " << atol(key) << ", rtol " << rt
              << ")\n";
  };
  auto pos = terms.representativeness * lr;
  auto neg = terms.diversity * ld;
  auto all = io.at("loss") + terms.total;
  EXPECT_EQ(terms.total.dim(), 0);
  check(pos, "pos_match_loss", rtol);
  check(neg, "neg_match_loss", rtol);
  check(all, "all_loss", rtol);
  check(grad_of(pos, pred), "grad_pos", rtol);
  check(grad_of(neg, pred), "grad_neg", rtol);
  check(grad_of(all, pred), "grad_all", rtol);

  // Intermediates (full cosine matrices) and the selected pairs.
  const int64_t* lab = ry.data_ptr<int64_t>();
  for (int64_t k = 0; k < num_classes; ++k) {
    const std::string pk = "cos_pos.c" + std::to_string(k), nk = "cos_neg.c" + std::to_string(k);
    if (!io.count(pk)) continue;
    auto rows = pred.detach().index_select(0, torch::nonzero(ry == k).flatten());
    check(mdd::bank_cosine(rows, real, k), pk, rtol);
    check(mdd::bank_cosine(rows, gen, k), nk, rtol);
  }
  const auto& am = c["argmin_argmax"];
  ASSERT_EQ(terms.pairs.size(0), static_cast<int64_t>(am.size())) << name;
  for (int64_t r = 0; r < terms.pairs.size(0); ++r) {
    auto p = terms.pairs[r];
    const int64_t k = p[0].item<int64_t>();
    auto within = [&](int64_t batch_row) {  // row of the batch -> row inside P_c
      int64_t w = 0;
      for (int64_t i = 0; i < batch_row; ++i) w += lab[i] == k;
      return w;
    };
    const auto& e = am["class " + std::to_string(k)];
    EXPECT_EQ(within(p[1].item<int64_t>()), e["argmin_cos_pos (row in P_c, memory row)"][0].get<int64_t>());
    EXPECT_EQ(p[2].item<int64_t>(), e["argmin_cos_pos (row in P_c, memory row)"][1].get<int64_t>());
    EXPECT_EQ(within(p[3].item<int64_t>()), e["argmax_cos_neg"][0].get<int64_t>());
    EXPECT_EQ(p[4].item<int64_t>(), e["argmax_cos_neg"][1].get<int64_t>());
  }

  // The fine-tuner's push after the loss: real = x, generated = detached prediction.
  real.push(io.at("x"), ry);
  gen.push(pred.detach(), ry);
  bool any_after = false;
  for (int64_t k = 0; k < num_classes; ++k) {
    const std::string rk = "real_memory_after.c" + std::to_string(k), gk = "pseudo_memory_after.c" + std::to_string(k);
    if (!io.count(rk)) continue;
    any_after = true;
    check(real.get(k), rk, 0.0);
    check(gen.get(k), gk, 0.0);
  }
  if (!any_after) {  // single-class case: MANIFEST note says after = cat(before, x), capacity not reached
    EXPECT_TRUE(torch::equal(real.get(0), torch::cat({io.at("real_memory.c0"), io.at("x")})));
    EXPECT_TRUE(torch::equal(gen.get(0), torch::cat({io.at("pseudo_memory.c0"), io.at("pseudo_embeddings")})));
  }
}

TEST(MinimaxGolden, SingleClass) { run_golden_case("minimax_loss"); }
TEST(MinimaxGolden, MultiClassWithTrimAndEmptyBank) { run_golden_case("minimax_loss_multiclass"); }

// ------------------------------------------------------------- plain ATen composition (oracle)

struct Plain {
  torch::Tensor R, D, total;
};

// The reference algorithm written with ordinary differentiable ATen ops, per class.
Plain plain_minimax(const torch::Tensor& pred, const torch::Tensor& labels, const MemoryBank& real,
                    const MemoryBank& gen, double lr, double ld) {
  auto lab = labels.to(torch::kCPU);
  std::set<int64_t> classes;
  for (int64_t i = 0; i < lab.size(0); ++i) classes.insert(lab[i].item<int64_t>());
  auto R = torch::zeros({}, pred.options().requires_grad(false));
  auto D = torch::zeros({}, pred.options().requires_grad(false));
  const double n = static_cast<double>(classes.size());
  for (int64_t c : classes) {
    if (gen.size(c) == 0) continue;
    auto P = pred.index_select(0, torch::nonzero(lab == c).flatten().to(pred.device())).flatten(1);
    auto M = real.get(c).flatten(1).to(pred.scalar_type());
    auto G = gen.get(c).flatten(1).to(pred.scalar_type());
    auto Pn = P / P.norm(2, {1}, true);
    auto cos_r = Pn.mm((M / M.norm(2, {1}, true)).t());
    auto cos_g = Pn.mm((G / G.norm(2, {1}, true)).t());
    R = R + (1 - cos_r.min()) / n;
    D = D + cos_g.max() / n;
  }
  return {R, D, R * lr + D * ld};
}

void fill_random(MemoryBank& bank, const std::vector<int64_t>& counts, std::vector<int64_t> shape, torch::Generator& g,
                 torch::ScalarType dt) {
  for (size_t c = 0; c < counts.size(); ++c) {
    if (counts[c] == 0) continue;
    std::vector<int64_t> s{counts[c]};
    s.insert(s.end(), shape.begin(), shape.end());
    bank.push(torch::randn(s, g, torch::TensorOptions().dtype(dt)), torch::full({counts[c]}, (int64_t)c, torch::kLong));
  }
}

void check_against_plain(torch::ScalarType dt, double tol, const std::vector<int64_t>& batch_labels,
                         const std::vector<int64_t>& real_counts, const std::vector<int64_t>& gen_counts, int64_t cap,
                         uint64_t seed) {
  auto g = at::detail::createCPUGenerator(seed);
  const int64_t nc = static_cast<int64_t>(real_counts.size());
  const std::vector<int64_t> shape{3, 5, 4};
  MemoryBank real(nc, cap), gen(nc, cap);
  fill_random(real, real_counts, shape, g, dt);
  fill_random(gen, gen_counts, shape, g, dt);
  auto labels = torch::tensor(batch_labels, torch::kLong);
  auto pred = torch::randn({labels.size(0), 3, 5, 4}, g, torch::TensorOptions().dtype(dt)).requires_grad_(true);
  const double lr = 0.3, ld = 0.7;
  auto fused = minimax_loss(pred, labels, real, gen, MinimaxLossOptions().lambda_r(lr).lambda_d(ld));
  auto plain = plain_minimax(pred, labels, real, gen, lr, ld);
  EXPECT_TRUE(mdd_test::AllClose(fused.representativeness, plain.R, tol));
  EXPECT_TRUE(mdd_test::AllClose(fused.diversity, plain.D, tol));
  EXPECT_TRUE(mdd_test::AllClose(fused.total, plain.total, tol));
  // Mixed upstream gradients through all three outputs.
  auto yf = fused.total * 1.5 + fused.representativeness * 0.25 - fused.diversity * 2.0;
  auto yp = plain.total * 1.5 + plain.R * 0.25 - plain.D * 2.0;
  auto gf = grad_of(yf, pred), gp = grad_of(yp, pred);
  if (!gp.defined()) gp = torch::zeros_like(pred);
  EXPECT_TRUE(mdd_test::AllClose(gf, gp, tol));
  EXPECT_EQ(gf.scalar_type(), pred.scalar_type());
}

TEST(MinimaxLoss, MatchesPlainCompositionFloat64) {
  // classes: 0 full + wrapped, 1 partial, 2 generated bank empty (counts but contributes nothing),
  // 3 full exactly, 4 not in the batch; several rows per class (incl. > 4 rows: BLAS path).
  const std::vector<int64_t> labels{0, 1, 2, 0, 3, 1, 0, 0, 0, 0, 0, 3};
  check_against_plain(torch::kDouble, 1e-12, labels, {13, 3, 2, 6, 1}, {9, 5, 0, 6, 2}, 6, 1);
  check_against_plain(torch::kDouble, 1e-12, {2, 2, 1}, {1, 1, 1}, {0, 4, 0}, 3, 2);
  check_against_plain(torch::kDouble, 1e-12, {0}, {1}, {1}, 1, 3);
}

TEST(MinimaxLoss, MatchesPlainCompositionFloat32) {
  const std::vector<int64_t> labels{4, 1, 2, 0, 3, 1, 0, 0, 0, 0, 0, 3, 4, 4};
  for (uint64_t seed = 10; seed < 14; ++seed) {
    check_against_plain(torch::kFloat, 2e-6, labels, {13, 3, 2, 6, 4}, {9, 5, 0, 6, 7}, 6, seed);
  }
}

TEST(MinimaxLoss, HalfPredictionComputedInFloat) {
  auto g = at::detail::createCPUGenerator(3);
  MemoryBank real(2, 4), gen(2, 4);
  real.push(torch::randn({4, 16}, g), torch::tensor({0, 0, 1, 1}, torch::kLong));
  gen.push(torch::randn({4, 16}, g), torch::tensor({0, 1, 1, 1}, torch::kLong));
  auto labels = torch::tensor({1, 0, 1}, torch::kLong);
  auto p32 = torch::randn({3, 16}, g).to(torch::kHalf).to(torch::kFloat).requires_grad_(true);
  auto p16 = p32.detach().to(torch::kHalf).requires_grad_(true);
  auto t32 = minimax_loss(p32, labels, real, gen);
  auto t16 = minimax_loss(p16, labels, real, gen);
  EXPECT_EQ(t16.total.scalar_type(), torch::kFloat);
  EXPECT_TRUE(mdd_test::AllClose(t16.total, t32.total, 0.0));  // same float32 computation
  auto g16 = grad_of(t16.total, p16);
  EXPECT_EQ(g16.scalar_type(), torch::kHalf);
  EXPECT_TRUE(mdd_test::AllClose(g16, grad_of(t32.total, p32), 1e-6));
}

TEST(MinimaxLoss, NoContributingClassGivesZero) {
  MemoryBank real(3, 4), gen(3, 4);
  auto pred = torch::randn({2, 8}).requires_grad_(true);
  auto t = minimax_loss(pred, torch::tensor({0, 2}, torch::kLong), real, gen);
  EXPECT_EQ(t.total.item<double>(), 0.0);
  EXPECT_EQ(t.pairs.size(0), 0);
  auto g = grad_of(t.total, pred);
  EXPECT_EQ(g.abs().sum().item<double>(), 0.0);
}

TEST(MinimaxLoss, ZeroVectorsAreFinite) {
  MemoryBank real(2, 4), gen(2, 4);
  auto items = torch::randn({4, 6});
  items[1].zero_();
  real.push(items, torch::tensor({0, 0, 1, 1}, torch::kLong));
  gen.push(torch::zeros({2, 6}), torch::tensor({0, 1}, torch::kLong));  // all-zero generated bank
  auto pred = torch::randn({3, 6});
  pred[0].zero_();
  pred.requires_grad_(true);
  auto t = minimax_loss(pred, torch::tensor({0, 0, 1}, torch::kLong), real, gen);
  EXPECT_TRUE(std::isfinite(t.total.item<double>()));
  EXPECT_EQ(t.diversity.item<double>(), 0.0);  // cos with a zero vector is 0
  auto g = grad_of(t.total, pred);
  EXPECT_TRUE(torch::isfinite(g).all().item<bool>());
  EXPECT_EQ(g[0].abs().sum().item<double>(), 0.0);  // zero query row: no gradient
}

TEST(MinimaxLoss, BackwardAfterPushUsesForwardMemory) {
  // The fine-tuner may push (overwriting ring slots) before calling backward.
  auto g = at::detail::createCPUGenerator(5);
  MemoryBank real(1, 2), gen(1, 2);
  real.push(torch::randn({2, 10}, g), torch::zeros({2}, torch::kLong));
  gen.push(torch::randn({2, 10}, g), torch::zeros({2}, torch::kLong));
  auto pred = torch::randn({3, 10}, g).requires_grad_(true);
  auto labels = torch::zeros({3}, torch::kLong);
  auto expect = grad_of(plain_minimax(pred, labels, real, gen, 0.002, 0.008).total, pred);
  auto t = minimax_loss(pred, labels, real, gen);
  real.push(torch::randn({2, 10}, g), torch::zeros({2}, torch::kLong));
  gen.push(torch::randn({2, 10}, g), torch::zeros({2}, torch::kLong));
  EXPECT_TRUE(mdd_test::AllClose(grad_of(t.total, pred), expect, 1e-9));
}

TEST(MinimaxLoss, Errors) {
  MemoryBank real(2, 4), gen(2, 4);
  real.push(torch::randn({2, 6}), torch::tensor({0, 1}, torch::kLong));
  gen.push(torch::randn({1, 6}), torch::tensor({1}, torch::kLong));
  auto pred = torch::randn({2, 6});
  EXPECT_THROW(minimax_loss(pred, torch::tensor({0, 2}, torch::kLong), real, gen), mdd::Error);    // label range
  EXPECT_THROW(minimax_loss(pred, torch::tensor({0}, torch::kLong), real, gen), mdd::Error);       // length
  EXPECT_THROW(minimax_loss(torch::randn({2, 7}), torch::tensor({0, 1}, torch::kLong), real, gen), mdd::Error);
  EXPECT_THROW(minimax_loss(pred, torch::tensor({0.0, 1.0}), real, gen), mdd::Error);              // float labels
  auto bad = pred.clone();
  bad[1][3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(minimax_loss(bad, torch::tensor({0, 1}, torch::kLong), real, gen), mdd::Error);     // NaN
  // check_finite off: NaN propagates instead.
  auto t = minimax_loss(bad, torch::tensor({0, 1}, torch::kLong), real, gen, MinimaxLossOptions().check_finite(false));
  EXPECT_TRUE(std::isnan(t.total.item<double>()));
  // generated bank non-empty, real bank empty: the reference cannot compute R (torch.cat([])).
  MemoryBank empty_real(2, 4);
  EXPECT_THROW(minimax_loss(pred, torch::tensor({0, 1}, torch::kLong), empty_real, gen), mdd::Error);
}

// ------------------------------------------------------------------------------ memory bank

TEST(MemoryBank, FifoOrderCapacityAndWrapAround) {
  MemoryBank bank(3, 4);
  EXPECT_EQ(bank.capacity(), 4);
  EXPECT_EQ(bank.size(1), 0);
  EXPECT_EQ(bank.get(1).numel(), 0);
  auto item = [](double v) { return torch::full({1, 2, 3}, v); };
  // class 1 receives 1..3, class 0 receives 10
  bank.push(torch::cat({item(1), item(10), item(2), item(3)}), torch::tensor({1, 0, 1, 1}, torch::kLong));
  EXPECT_EQ(bank.size(1), 3);
  EXPECT_EQ(bank.size(0), 1);
  EXPECT_EQ(bank.get(1).sizes(), (std::vector<int64_t>{3, 2, 3}));
  const auto base = bank.storage(1).data_ptr();
  // 4..9 into class 1: only the last 4 pushed survive overall: 6, 7, 8, 9
  bank.push(torch::cat({item(4), item(5), item(6), item(7), item(8), item(9)}), torch::full({6}, 1, torch::kLong));
  auto got = bank.get(1).select(1, 0).select(1, 0);
  EXPECT_TRUE(torch::equal(got, torch::tensor({6.f, 7.f, 8.f, 9.f}))) << got;
  EXPECT_EQ(bank.size(1), 4);
  std::vector<float> pushed{6, 7, 8, 9};
  for (int v = 11; v < 20; ++v) {  // wrap-around several times, one at a time
    bank.push(item(v), torch::tensor({1}, torch::kLong));
    pushed.push_back(static_cast<float>(v));
    auto g = bank.get(1).select(1, 0).select(1, 0);
    auto expect = torch::tensor(std::vector<float>(pushed.end() - 4, pushed.end()));
    EXPECT_TRUE(torch::equal(g, expect)) << g;
    EXPECT_EQ(bank.storage(1).data_ptr(), base);  // never reallocated
    EXPECT_EQ(bank.slot(1, 0), bank.head(1));
  }
  // cached norms match the stored items
  auto norms = bank.norms(1);
  auto expect = bank.storage(1).to(torch::kDouble).norm(2, {1});
  EXPECT_TRUE(mdd_test::AllClose(norms, expect, 1e-12));
  // get returns a copy
  auto copy = bank.get(0);
  copy.fill_(-1);
  EXPECT_EQ(bank.get(0).min().item<float>(), 10.f);
  EXPECT_EQ(bank.size(2), 0);
  bank.clear();
  EXPECT_EQ(bank.size(1), 0);
}

TEST(MemoryBank, StoresDetached) {
  MemoryBank bank(1, 2);
  auto x = torch::randn({1, 4}, torch::requires_grad());
  bank.push(x * 2, torch::zeros({1}, torch::kLong));
  EXPECT_FALSE(bank.get(0).requires_grad());
  EXPECT_FALSE(bank.storage(0).requires_grad());
}

TEST(MemoryBank, Errors) {
  EXPECT_THROW(MemoryBank(0, 4), mdd::Error);
  EXPECT_THROW(MemoryBank(2, 0), mdd::Error);
  MemoryBank bank(2, 4);
  EXPECT_THROW(bank.push(torch::randn({2, 3}), torch::tensor({0, 2}, torch::kLong)), mdd::Error);   // range
  EXPECT_THROW(bank.push(torch::randn({2, 3}), torch::tensor({0, -1}, torch::kLong)), mdd::Error);  // range
  EXPECT_THROW(bank.push(torch::randn({2, 3}), torch::tensor({0}, torch::kLong)), mdd::Error);      // length
  bank.push(torch::randn({2, 3}), torch::tensor({0, 1}, torch::kLong));
  EXPECT_THROW(bank.push(torch::randn({1, 4}), torch::tensor({0}, torch::kLong)), mdd::Error);      // shape
  auto nan = torch::randn({1, 3});
  nan[0][0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(bank.push(nan, torch::tensor({0}, torch::kLong)), mdd::Error);
  EXPECT_EQ(bank.size(0), 1);  // failed pushes leave the bank unchanged
  EXPECT_THROW(bank.get(5), mdd::Error);
  EXPECT_THROW(bank.size(-1), mdd::Error);
  EXPECT_THROW(bank.slot(0, 1), mdd::Error);
}

TEST(MemoryBank, StateRoundTrip) {
  auto g = at::detail::createCPUGenerator(7);
  MemoryBank a(3, 3);
  a.push(torch::randn({7, 2, 2}, g), torch::tensor({0, 0, 2, 0, 0, 2, 0}, torch::kLong));
  auto st = a.state("real.");
  const auto dir = mdd_test::tmp_dir("minimax_state");
  mdd::io::save_safetensors(dir + "/bank.safetensors", st);
  MemoryBank b(3, 3);
  b.load_state(mdd::io::load_safetensors(dir + "/bank.safetensors").tensors, "real.");
  for (int64_t c = 0; c < 3; ++c) {
    EXPECT_EQ(a.size(c), b.size(c));
    EXPECT_TRUE(torch::equal(a.get(c), b.get(c)));
  }
  MemoryBank wrong(3, 4);
  EXPECT_THROW(wrong.load_state(st, "real."), mdd::Error);
  auto bad = st;
  bad["real.class.9"] = torch::zeros({1, 2, 2});
  EXPECT_THROW(b.load_state(bad, "real."), mdd::Error);
}

// ---------------------------------------------------------------------------------------- CUDA

TEST(MinimaxCuda, MatchesCpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  auto g = at::detail::createCPUGenerator(11);
  const std::vector<int64_t> counts{7, 2, 5, 0};
  for (auto dt : {torch::kFloat, torch::kDouble}) {
    MemoryBank real_c(4, 5), gen_c(4, 5), real_g(4, 5), gen_g(4, 5);
    for (size_t c = 0; c < counts.size(); ++c) {
      if (!counts[c]) continue;
      auto lab = torch::full({counts[c]}, (int64_t)c, torch::kLong);
      auto r = torch::randn({counts[c], 4, 4, 4}, g, torch::TensorOptions().dtype(dt));
      auto q = torch::randn({counts[c], 4, 4, 4}, g, torch::TensorOptions().dtype(dt));
      real_c.push(r, lab);
      gen_c.push(q, lab);
      real_g.push(r.cuda(), lab.cuda());
      gen_g.push(q.cuda(), lab.cuda());
    }
    auto labels = torch::tensor({0, 1, 2, 3, 0, 0, 0, 0, 0, 0, 1, 2}, torch::kLong);
    auto pred = torch::randn({12, 4, 4, 4}, g, torch::TensorOptions().dtype(dt)).requires_grad_(true);
    auto pred_g = pred.detach().cuda().requires_grad_(true);
    auto tc = minimax_loss(pred, labels, real_c, gen_c);
    auto tg = minimax_loss(pred_g, labels.cuda(), real_g, gen_g);
    const double tol = dt == torch::kDouble ? 1e-12 : 1e-6;
    EXPECT_TRUE(mdd_test::AllClose(tg.total.cpu(), tc.total, tol));
    EXPECT_TRUE(mdd_test::AllClose(tg.representativeness.cpu(), tc.representativeness, tol));
    EXPECT_TRUE(torch::equal(tg.pairs.cpu(), tc.pairs));
    auto gc = grad_of(tc.total * 3 + tc.diversity, pred);
    auto gg = grad_of(tg.total * 3 + tg.diversity, pred_g);
    EXPECT_TRUE(mdd_test::AllClose(gg.cpu(), gc, tol));
  }
}

}  // namespace
