// Augmentation ops, coreset selection, MMD and the evaluator on tiny synthetic data.
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "mdd/eval/augment.h"
#include "mdd/eval/evaluator.h"
#include "mdd/eval/mmd.h"
#include "mdd/eval/proxy.h"
#include "mdd/eval/selection.h"
#include "mdd/models/eval_nets.h"
#include "mdd/util/error.h"
#include "test_util.h"

namespace {

torch::Generator gen(uint64_t seed) { return torch::make_generator<torch::CPUGeneratorImpl>(seed); }

// ------------------------------------------------------------------------------ augmentation

TEST(Augment, RandomResizedCropShapeAndDeterminism) {
  auto x = torch::rand({4, 3, 40, 30}, gen(1));
  auto a = mdd::random_resized_crop(x, 24, gen(5));
  auto b = mdd::random_resized_crop(x, 24, gen(5));
  auto c = mdd::random_resized_crop(x, 24, gen(6));
  EXPECT_EQ(a.sizes().vec(), (std::vector<int64_t>{4, 3, 24, 24}));
  EXPECT_TRUE(torch::equal(a, b));
  EXPECT_FALSE(torch::equal(a, c));
  // A constant image stays constant whatever the crop.
  auto k = torch::full({2, 1, 16, 16}, 0.25);
  EXPECT_TRUE(mdd_test::AllClose(mdd::random_resized_crop(k, 8, gen(2)), torch::full({2, 1, 8, 8}, 0.25), 1e-6));
}

TEST(Augment, FlipProbabilityExtremes) {
  auto x = torch::rand({3, 3, 5, 7}, gen(1));
  EXPECT_TRUE(torch::equal(mdd::random_horizontal_flip(x, gen(0), 1.0), x.flip({3})));
  EXPECT_TRUE(torch::equal(mdd::random_horizontal_flip(x, gen(0), 0.0), x));
  auto a = mdd::random_horizontal_flip(x, gen(9)), b = mdd::random_horizontal_flip(x, gen(9));
  EXPECT_TRUE(torch::equal(a, b));
}

TEST(Augment, ColorJitterIsLerpWithinRange) {
  auto x = torch::rand({6, 3, 8, 8}, gen(3));
  EXPECT_TRUE(torch::equal(mdd::color_jitter(x, gen(1), 0, 0, 0), x));
  // Brightness only: every sample is scaled by (1 - a), |a| <= 0.4.
  auto y = mdd::color_jitter(x, gen(1), 0.4, 0, 0);
  for (int64_t i = 0; i < 6; ++i) {
    const double s = (y[i] / x[i]).mean().item<double>();
    EXPECT_TRUE(mdd_test::AllClose(y[i], x[i] * s, 1e-5));
    EXPECT_GE(s, 0.6 - 1e-6);
    EXPECT_LE(s, 1.4 + 1e-6);
  }
  // Saturation only on a grey image is the identity (the lerp target equals the image).
  auto g = torch::rand({2, 1, 8, 8}, gen(4)).expand({-1, 3, -1, -1}).contiguous();
  EXPECT_TRUE(mdd_test::AllClose(mdd::color_jitter(g, gen(2), 0, 0, 0.4), g, 1e-6));
  EXPECT_TRUE(torch::equal(mdd::color_jitter(x, gen(8)), mdd::color_jitter(x, gen(8))));
}

TEST(Augment, LightingAddsPerChannelConstant) {
  auto x = torch::rand({4, 3, 6, 6}, gen(3));
  auto y = mdd::lighting(x, gen(7), 0.1);
  auto d = y - x;
  EXPECT_TRUE(mdd_test::AllClose(d, d.mean({2, 3}, true).expand_as(d), 1e-6));
  EXPECT_GT(d.abs().max().item<double>(), 0.0);
  EXPECT_TRUE(torch::equal(y, mdd::lighting(x, gen(7), 0.1)));
  EXPECT_THROW(mdd::lighting(torch::rand({1, 1, 4, 4}), gen(0)), mdd::Error);
}

TEST(Augment, CutMixLambdaRule) {
  const int64_t n = 8, s = 16;
  // Sample i is filled with the value i, label i: the pasted box reveals where pixels came from.
  auto x = torch::arange(n, torch::kFloat32).view({n, 1, 1, 1}).expand({n, 3, s, s}).contiguous();
  auto labels = torch::arange(n, torch::kLong);
  double lambda_sum = 0;
  const int trials = 200;
  for (int t = 0; t < trials; ++t) {
    auto cm = mdd::cutmix(x, labels, gen(100 + t));
    lambda_sum += cm.lambda;
    const double box = static_cast<double>((cm.x2 - cm.x1) * (cm.y2 - cm.y1));
    EXPECT_DOUBLE_EQ(cm.ratio, 1.0 - box / (s * s));
    // Reference box rule: cut = int(S * sqrt(1 - lambda)), half-widths cut // 2, clipped.
    const int64_t cut = static_cast<int64_t>(s * std::sqrt(1.0 - cm.lambda));
    EXPECT_LE(cm.x2 - cm.x1, 2 * (cut / 2));
    EXPECT_LE(cm.y2 - cm.y1, 2 * (cut / 2));
    for (int64_t i = 0; i < n; ++i) {
      auto img = cm.images[i][0];
      auto own = (img == static_cast<float>(i)).to(torch::kFloat64).mean().item<double>();
      auto from_b = (img == static_cast<float>(cm.labels_b[i].item<int64_t>())).to(torch::kFloat64).mean().item<double>();
      if (cm.labels_b[i].item<int64_t>() != i) {
        EXPECT_DOUBLE_EQ(own, cm.ratio);
        EXPECT_DOUBLE_EQ(from_b, 1.0 - cm.ratio);
      }
    }
    EXPECT_TRUE(torch::equal(cm.labels_a, labels));
  }
  EXPECT_NEAR(lambda_sum / trials, 0.5, 0.06);  // Beta(1, 1) = U(0, 1)
  auto a = mdd::cutmix(x, labels, gen(1)), b = mdd::cutmix(x, labels, gen(1));
  EXPECT_TRUE(torch::equal(a.images, b.images));
}

TEST(Augment, TestTransformResizesAndNormalises) {
  auto x = torch::full({2, 3, 20, 30}, 0.5);
  auto y = mdd::test_transform(x, 10, {0.5, 0.5, 0.5}, {0.25, 0.25, 0.25});
  EXPECT_EQ(y.sizes().vec(), (std::vector<int64_t>{2, 3, 10, 10}));
  EXPECT_TRUE(mdd_test::AllClose(y, torch::zeros_like(y), 1e-6));
  auto z = mdd::idc_train_transform(torch::rand({2, 3, 20, 20}, gen(0)), 16, {0.485, 0.456, 0.406},
                                    {0.229, 0.224, 0.225}, gen(3));
  EXPECT_EQ(z.sizes().vec(), (std::vector<int64_t>{2, 3, 16, 16}));
  EXPECT_THROW(mdd::normalize_batch(x, {0.5}, {0.5}), mdd::Error);
}

// ------------------------------------------------------------------------------ selection

TEST(Selection, HerdingAndKCenterKnownAnswers) {
  // Class 0 points on a line: 0, 10, -10, 1, 5 (mean 1.2); class 1: 100, 101.
  auto f = torch::tensor({0.0, 10.0, -10.0, 1.0, 5.0, 100.0, 101.0}).view({-1, 1});
  auto y = torch::tensor({0, 0, 0, 0, 0, 1, 1}, torch::kLong);
  // Herding: 1 (closest to 1.2), then 0 ((1 + 0) / 2 = 0.5 is the closest mean to 1.2).
  auto h = mdd::select_herding(f, y, 2);
  EXPECT_EQ(std::vector<int64_t>(h.data_ptr<int64_t>(), h.data_ptr<int64_t>() + h.numel()),
            (std::vector<int64_t>{3, 0, 5, 6}));
  // K-Center: start at 1 (closest to the mean), then -10 (farthest), then 10.
  auto k = mdd::select_kcenter(f, y, 2);
  EXPECT_EQ(std::vector<int64_t>(k.data_ptr<int64_t>(), k.data_ptr<int64_t>() + k.numel()),
            (std::vector<int64_t>{3, 2, 5, 6}));
  auto k0 = mdd::select_kcenter(f.slice(0, 0, 5), y.slice(0, 0, 5), 3);
  EXPECT_EQ(std::vector<int64_t>(k0.data_ptr<int64_t>(), k0.data_ptr<int64_t>() + 3), (std::vector<int64_t>{3, 2, 1}));
  EXPECT_THROW(mdd::select_herding(f, y, 3), mdd::Error);  // class 1 has only 2 samples
}

TEST(Selection, HerdingTowardGivenTargets) {
  // Same points; targets: class 0 -> 7, class 1 -> 100.
  auto f = torch::tensor({0.0, 10.0, -10.0, 1.0, 5.0, 100.0, 101.0}).view({-1, 1});
  auto y = torch::tensor({0, 0, 0, 0, 0, 1, 1}, torch::kLong);
  auto targets = torch::tensor({7.0, 100.0}).view({2, 1});
  // Class 0 toward 7: 5 first (|5-7| = 2), then 10 ((5 + 10) / 2 = 7.5); class 1: 100, then 101.
  auto h = mdd::select_herding(f, y, 2, targets);
  EXPECT_EQ(std::vector<int64_t>(h.data_ptr<int64_t>(), h.data_ptr<int64_t>() + h.numel()),
            (std::vector<int64_t>{4, 1, 5, 6}));
  // The class means as targets give plain herding.
  auto means = mdd::class_means(f, y, 2);
  EXPECT_NEAR(means[0][0].item<double>(), 1.2, 1e-12);
  EXPECT_NEAR(means[1][0].item<double>(), 100.5, 1e-12);
  EXPECT_TRUE(torch::equal(mdd::select_herding(f, y, 2, means), mdd::select_herding(f, y, 2)));
  // Bad targets: wrong width, too few classes, NaN; a class without samples; NaN features.
  EXPECT_THROW(mdd::select_herding(f, y, 2, torch::zeros({2, 3})), mdd::Error);
  EXPECT_THROW(mdd::select_herding(f, y, 2, torch::zeros({1, 1})), mdd::Error);
  EXPECT_THROW(mdd::select_herding(f, y, 2, torch::full({2, 1}, std::nan(""))), mdd::Error);
  EXPECT_THROW(mdd::select_herding(f, y, 2, torch::Tensor()), mdd::Error);
  EXPECT_THROW(mdd::class_means(f, y, 3), mdd::Error);
  auto bad = f.clone();
  bad[2][0] = std::numeric_limits<double>::infinity();
  EXPECT_THROW(mdd::select_herding(bad, y, 2), mdd::Error);
}

TEST(Selection, RandomAndFirst) {
  auto y = torch::tensor({1, 0, 1, 0, 1, 0, 1, 0}, torch::kLong);
  auto a = mdd::select_random(y, 2, 7), b = mdd::select_random(y, 2, 7);
  EXPECT_TRUE(torch::equal(a, b));
  auto picked = y.index_select(0, a);
  EXPECT_EQ(picked.eq(0).sum().item<int64_t>(), 2);
  EXPECT_EQ(picked.eq(1).sum().item<int64_t>(), 2);
  EXPECT_EQ(std::get<0>(torch::_unique(a)).numel(), 4);
  auto f = mdd::select_first(y, 2);
  EXPECT_EQ(std::vector<int64_t>(f.data_ptr<int64_t>(), f.data_ptr<int64_t>() + 4), (std::vector<int64_t>{1, 3, 0, 2}));
  EXPECT_THROW(mdd::select_coreset("grad", torch::Tensor(), y, 1), mdd::Error);
  mdd::LabeledImages d{torch::zeros({8, 2, 2, 1}, torch::kUInt8), y, {"a", "b"}};
  auto s = mdd::subset(d, f);
  EXPECT_EQ(s.images.size(0), 4);
  EXPECT_TRUE(torch::equal(s.labels, torch::tensor({0, 0, 1, 1}, torch::kLong)));
}

// ------------------------------------------------------------------------------ MMD

TEST(MMD, UnbiasedFormulaByHand) {
  auto x = torch::tensor({0.0, 1.0}).view({2, 1});
  auto y = torch::tensor({0.0, 2.0}).view({2, 1});
  const double kxx = std::exp(-0.5);                        // off-diagonal mean, m = 2
  const double kyy = std::exp(-2.0);
  const double kxy = (1.0 + std::exp(-2.0) + 2.0 * std::exp(-0.5)) / 4.0;
  const double expected = kxx + kyy - 2.0 * kxy;            // sigma = 1
  EXPECT_NEAR(mdd::mmd2(x, y, mdd::MMDOptions().bandwidths({1.0})), expected, 1e-12);
  // Two bandwidths: the kernel is the sum.
  const double k2 = std::exp(-0.5 / 4) + std::exp(-2.0 / 4) - 2.0 * (1.0 + std::exp(-2.0 / 4) + 2.0 * std::exp(-0.5 / 4)) / 4.0;
  EXPECT_NEAR(mdd::mmd2(x, y, mdd::MMDOptions().bandwidths({1.0, 2.0})), expected + k2, 1e-12);
  // Median heuristic: pooled {0, 1, 3, 4} distances 1,3,4,2,3,1 -> median 2.5.
  EXPECT_DOUBLE_EQ(mdd::median_bandwidth(x, torch::tensor({3.0, 4.0}).view({2, 1})), 2.5);
}

TEST(MMD, ZeroInExpectationPositiveWhenShifted) {
  double same = 0;
  const int reps = 10;
  for (int r = 0; r < reps; ++r) {
    auto a = torch::randn({100, 4}, gen(2 * r)), b = torch::randn({100, 4}, gen(2 * r + 1));
    same += mdd::mmd2(a, b);
  }
  same /= reps;
  auto a = torch::randn({100, 4}, gen(50)), b = torch::randn({100, 4}, gen(51)) + 1.0;
  const double shifted = mdd::mmd2(a, b);
  EXPECT_LT(std::abs(same), 0.01);
  EXPECT_GT(shifted, 20 * std::abs(same));
  EXPECT_GT(mdd::mmd2(a, b, mdd::MMDOptions().multipliers({0.5, 1.0, 2.0})), 0.0);
  EXPECT_THROW(mdd::mmd2(a, torch::randn({10, 3})), mdd::Error);
}

// ------------------------------------------------------------------------------ evaluator

/// Grey 16x16 images, 3 classes: a bright 6x6 square in a class-specific place, plus noise.
mdd::LabeledImages toy_set(int64_t per_class, uint64_t seed) {
  const int64_t n = 3 * per_class;
  auto g = gen(seed);
  auto img = (torch::rand({n, 16, 16, 1}, g) * 60).to(torch::kFloat32);
  auto labels = torch::arange(n, torch::kLong).remainder(3);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = labels[i].item<int64_t>();
    img[i].slice(0, 2 + 4 * c, 8 + 4 * c).slice(1, 2 + 4 * c, 8 + 4 * c) += 180;
  }
  return {img.clamp(0, 255).to(torch::kUInt8), labels, {"a", "b", "c"}};
}

TEST(Evaluator, LearnsSeparableSetAndIsDeterministic) {
  auto train = toy_set(10, 1), test = toy_set(20, 2);
  auto opts = mdd::EvalOptions().protocol("dc").net("convnet2").width(16).epochs(12).repeats(2).seed(3).batch_size(8);
  int64_t calls = 0;
  auto res = mdd::evaluate(train, test, opts, [&](const mdd::Progress& p) {
    ++calls;
    EXPECT_EQ(p.total, 13);
  });
  ASSERT_EQ(res.best.size(), 2u);
  EXPECT_EQ(calls, 26);
  EXPECT_GE(res.mean, 90.0);
  EXPECT_EQ(res.best, res.last);  // dc tests once, at the end
  auto again = mdd::evaluate(train, test, opts);
  EXPECT_EQ(again.best, res.best);
}

TEST(Evaluator, IdcRecipeRunsWithAugmentation) {
  auto train = toy_set(4, 1), test = toy_set(4, 2);
  auto opts = mdd::EvalOptions().protocol("idc").net("resnet_ap10").width(8).image_size(32).epochs(2).eval_every(1);
  mdd::Evaluator ev(opts);
  auto r = ev.resolve(train, test);
  EXPECT_EQ(r.in_channels, 3);  // grey replicated for the RGB protocol
  EXPECT_EQ(r.batch_size, 64);
  EXPECT_EQ(r.augment, "idc");
  EXPECT_EQ(r.mean, (std::vector<double>{0.485, 0.456, 0.406}));
  auto res = ev.run(train, test);
  ASSERT_EQ(res.best.size(), 1u);
  EXPECT_GE(res.best[0], res.last[0]);
  EXPECT_GE(res.best[0], 0.0);
  EXPECT_LE(res.best[0], 100.0);
  // The paper's epochs rule and the DC decay point.
  EXPECT_EQ(mdd::ipc_epoch(1), 3000);
  EXPECT_EQ(mdd::ipc_epoch(10), 2000);
  EXPECT_EQ(mdd::ipc_epoch(50), 1500);
  EXPECT_EQ(mdd::ipc_epoch(100), 1000);
  EXPECT_EQ(mdd::ipc_epoch(10, 100), 1300);
  EXPECT_EQ(mdd::ipc_epoch(10), mdd::Evaluator(mdd::EvalOptions()).resolve(toy_set(10, 1), test).epochs);
  auto dc = mdd::Evaluator(mdd::EvalOptions().protocol("dc")).resolve(train, test);
  EXPECT_EQ(dc.epochs, 300);
  EXPECT_EQ(dc.milestones, (std::vector<int64_t>{152}));
  EXPECT_EQ(dc.in_channels, 1);
  EXPECT_EQ(dc.net, "convnet3");
  EXPECT_EQ(dc.batch_size, 256);
}

// The paper's recipe at a grey set's own size (the README's idc column: ConvNet-3 at 28 px with the
// dataset's one-channel statistics): the images are replicated to RGB, the statistics to three
// channels, and crops/tests run at image_size rather than 224.
TEST(Evaluator, IdcRecipeAtTheSetsOwnSizeOnGreyImages) {
  auto train = toy_set(4, 1), test = toy_set(4, 2);
  auto opts = mdd::EvalOptions().protocol("idc").net("convnet2").width(8).image_size(16).epochs(2).eval_every(1)
                  .mean({0.2861}).std({0.3530});
  mdd::Evaluator ev(opts);
  auto r = ev.resolve(train, test);
  EXPECT_EQ(r.in_channels, 3);
  EXPECT_EQ(r.image_size, 16);
  EXPECT_EQ(r.mean, (std::vector<double>(3, 0.2861)));
  EXPECT_EQ(r.std, (std::vector<double>(3, 0.3530)));
  const auto x = mdd::Evaluator::prepare(test.images, r);
  EXPECT_EQ(x.sizes(), (std::vector<int64_t>{12, 3, 16, 16}));
  auto res = ev.run(train, test);
  ASSERT_EQ(res.best.size(), 1u);
  EXPECT_GE(res.best[0], res.last[0]);
  // Three statistics for one channel are refused, not broadcast.
  EXPECT_THROW(mdd::Evaluator(mdd::EvalOptions().protocol("dc").mean({0.1, 0.2, 0.3}).std({1, 1, 1})).resolve(train, test),
               mdd::Error);
}

// evaluate_sets with a repeat folder: every finished repeat is kept and reused on the next call, so
// an interrupted evaluation resumes; files of other recipes, seeds or data, damaged files and
// impossible values are never reused.
TEST(Evaluator, RepeatFolderResumesAndIgnoresForeignFiles) {
  namespace fs = std::filesystem;
  const int threads = torch::get_num_threads();
  torch::set_num_threads(1);
  auto train = toy_set(6, 1), test = toy_set(10, 2);
  // Shuffled labels: each seed learns something else, so a repeat run with the wrong seed shows.
  train.labels = train.labels.index_select(0, torch::randperm(train.labels.size(0), gen(9)));
  const auto opts = mdd::EvalOptions().protocol("dc").net("convnet2").width(8).epochs(3).repeats(3).seed(5).batch_size(8);
  const std::vector<mdd::EvalSet> sets{mdd::EvalSet{&train, opts, "toy set/1"}};
  const std::string dir = mdd_test::tmp_dir("eval_repeats") + "/repeats";
  const mdd::EvalResult fresh = mdd::evaluate_sets(sets, test).front();
  ASSERT_FALSE(fresh.best[0] == fresh.best[1] && fresh.best[1] == fresh.best[2]) << "seeds must give different repeats";

  auto run = [&](int* events = nullptr) {
    return mdd::evaluate_sets(sets, test, {}, [&](const mdd::Progress& p) {
             if (events && p.step == p.total) ++*events;
           }, dir).front();
  };
  auto file_of = [&](uint64_t seed) {
    for (const auto& e : fs::directory_iterator(dir)) {
      const std::string n = e.path().filename().string();
      if (n.rfind("toy_set_1-s" + std::to_string(seed) + "-", 0) == 0) return e.path().string();
    }
    return std::string();
  };
  auto read = [](const std::string& path) {
    std::ifstream in(path);
    return nlohmann::json::parse(in);
  };
  auto write = [](const std::string& path, const std::string& text) { std::ofstream(path) << text; };

  const mdd::EvalResult first = run();
  EXPECT_EQ(first.best, fresh.best);
  EXPECT_EQ(first.last, fresh.last);
  EXPECT_EQ(first.reused, 0);
  int files = 0;
  for (const auto& e : fs::directory_iterator(dir)) files += e.path().extension() == ".json";
  EXPECT_EQ(files, 3);
  for (uint64_t s : {5, 6, 7}) ASSERT_FALSE(file_of(s).empty()) << "no file for seed " << s;

  // All kept: nothing is trained again, and progress still ends every repeat.
  int events = 0;
  const mdd::EvalResult again = run(&events);
  EXPECT_EQ(again.reused, 3);
  EXPECT_EQ(again.best, fresh.best);
  EXPECT_EQ(events, 3);

  // A stored value is what comes back (it is not recomputed) ...
  nlohmann::json j = read(file_of(6));
  j["best"] = 12.5;
  write(file_of(6), j.dump());
  // ... a cut-short run left seed 7 undone, and seed 5's file is damaged: both run again.
  fs::remove(file_of(7));
  write(file_of(5), "{\"signature\": {\"format\": ");
  const mdd::EvalResult resumed = run();
  EXPECT_EQ(resumed.reused, 1);
  EXPECT_EQ(resumed.best[0], fresh.best[0]);
  EXPECT_EQ(resumed.best[1], 12.5);
  EXPECT_EQ(resumed.best[2], fresh.best[2]);
  EXPECT_EQ(resumed.last[2], fresh.last[2]);
  EXPECT_EQ(read(file_of(5))["best"].get<double>(), fresh.best[0]) << "the damaged file is rewritten";
  EXPECT_EQ(read(file_of(7))["best"].get<double>(), fresh.best[2]);

  // Another seed's file under this seed's name, and values no accuracy can have: ignored.
  const std::string seed5 = file_of(5);
  fs::copy_file(seed5, file_of(6), fs::copy_options::overwrite_existing);
  nlohmann::json bad = read(file_of(7));
  bad["best"] = 250.0;
  write(file_of(7), bad.dump());
  const mdd::EvalResult checked = run();
  EXPECT_EQ(checked.reused, 1);
  EXPECT_EQ(checked.best, fresh.best);

  // Another recipe or other data reuse nothing from this folder.
  const auto longer = mdd::EvalOptions(opts).epochs(4);
  EXPECT_EQ(mdd::evaluate_sets({mdd::EvalSet{&train, longer, "toy set/1"}}, test, {}, {}, dir).front().reused, 0);
  auto other = train;
  other.images = other.images.clone();
  other.images[0][0][0][0] = other.images[0][0][0][0].item<int64_t>() ^ 1;
  EXPECT_EQ(mdd::evaluate_sets({mdd::EvalSet{&other, opts, "toy set/1"}}, test, {}, {}, dir).front().reused, 0);

  // A folder that cannot be written is an error, not a silently lost repeat.
  const std::string blocker = mdd_test::tmp_dir("eval_repeats_blocked") + "/file";
  write(blocker, "x");
  EXPECT_THROW(mdd::evaluate_sets(sets, test, {}, {}, blocker + "/repeats"), mdd::Error);
  torch::set_num_threads(threads);
}

TEST(Evaluator, BadOptionsThrow) {
  auto train = toy_set(2, 1), test = toy_set(2, 2);
  EXPECT_THROW(mdd::Evaluator(mdd::EvalOptions().protocol("imagenet")), mdd::Error);
  EXPECT_THROW(mdd::Evaluator(mdd::EvalOptions().norm("layer")), mdd::Error);
  EXPECT_THROW(mdd::Evaluator(mdd::EvalOptions().augment("dsa")), mdd::Error);
  EXPECT_THROW(mdd::Evaluator(mdd::EvalOptions().repeats(0)), mdd::Error);
  EXPECT_THROW(mdd::evaluate(train, test, mdd::EvalOptions().protocol("dc").net("vgg11").epochs(1)), mdd::Error);
  auto bad = train;
  bad.images = bad.images.to(torch::kFloat32);
  EXPECT_THROW(mdd::evaluate(bad, test, mdd::EvalOptions().protocol("dc").epochs(1)), mdd::Error);
  auto rgb = test;
  rgb.images = rgb.images.expand({-1, -1, -1, 3}).contiguous();
  EXPECT_THROW(mdd::evaluate(train, rgb, mdd::EvalOptions().protocol("dc").epochs(1)), mdd::Error);
}

}  // namespace

// ------------------------------------------------------------------------------ generator proxy

TEST(Proxy, FrechetDistanceKnownAnswers) {
  auto g = gen(11);
  auto a = torch::randn({400, 6}, g, torch::kFloat64);
  EXPECT_NEAR(mdd::frechet_distance(a, a), 0.0, 1e-8);
  // A pure shift keeps the covariance: the distance is the squared shift.
  auto shift = torch::tensor({1.0, -2.0, 0.5, 0.0, 0.0, 3.0}, torch::kFloat64);
  EXPECT_NEAR(mdd::frechet_distance(a, a + shift), 1 + 4 + 0.25 + 9, 1e-6);
  // Scaling by k: tr(S) (1 + k^2 - 2k) = tr(S) (k - 1)^2.
  const double trs = ((a - a.mean(0)).pow(2).sum(0) / 399).sum().item<double>();
  EXPECT_NEAR(mdd::frechet_distance(a, 3 * a), trs * 4 + (2 * a.mean(0)).pow(2).sum().item<double>(), 1e-6);
  EXPECT_THROW(mdd::frechet_distance(a, a.narrow(1, 0, 5)), mdd::Error);
  EXPECT_THROW(mdd::frechet_distance(a.narrow(0, 0, 1), a), mdd::Error);
  auto bad = a.clone();
  bad[0][0] = std::nan("");
  EXPECT_THROW(mdd::frechet_distance(bad, a), mdd::Error);
}

TEST(Proxy, ScoresFaithfulSetsAboveMislabelledOnesAndRoundTrips) {
  auto train = toy_set(12, 1), test = toy_set(10, 2);
  auto opts = mdd::ProxyOptions().eval(mdd::EvalOptions().protocol("dc").net("convnet2").width(16).epochs(10).batch_size(8));
  mdd::GeneratorProxy proxy(train, test, opts);
  EXPECT_GE(proxy.real_test_accuracy(), 90.0);
  auto good = toy_set(6, 5);
  auto s_good = proxy.score(good);
  mdd::LabeledImages wrong = good;
  wrong.labels = (good.labels + 1).remainder(3);
  auto s_wrong = proxy.score(wrong);
  EXPECT_GE(s_good.class_accuracy, 90.0);
  EXPECT_LE(s_wrong.class_accuracy, 10.0);
  ASSERT_EQ(s_good.per_class.size(), 3u);
  // Noise images are far from the real features; faithful ones are near the real floor.
  mdd::LabeledImages noise{(torch::rand({18, 16, 16, 1}, gen(9)) * 255).to(torch::kUInt8), good.labels, {}};
  auto s_noise = proxy.score(noise);
  EXPECT_GT(s_noise.frechet, 2 * s_good.frechet);
  EXPECT_GT(s_good.frechet_real_floor, 0.0);
  // Written and read back: the same scores without retraining.
  const std::string path = mdd_test::tmp_dir("proxy") + "/proxy.safetensors";
  proxy.save(path);
  auto loaded = mdd::GeneratorProxy::load(path, train, test);
  auto s_loaded = loaded.score(good);
  EXPECT_DOUBLE_EQ(s_loaded.class_accuracy, s_good.class_accuracy);
  EXPECT_NEAR(s_loaded.frechet, s_good.frechet, 1e-9 * (1 + s_good.frechet));
  // Bad inputs.
  mdd::LabeledImages other{torch::zeros({4, 8, 8, 1}, torch::kUInt8), torch::zeros({4}, torch::kInt64), {}};
  EXPECT_THROW(proxy.score(other), mdd::Error);
  mdd::LabeledImages badlab = good;
  badlab.labels = good.labels + 5;
  EXPECT_THROW(proxy.score(badlab), mdd::Error);
  EXPECT_THROW(mdd::GeneratorProxy::load(mdd_test::data_path("dit_small.weights.safetensors"), train, test), mdd::Error);
}
