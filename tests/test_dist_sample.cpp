// Sharded sampling and evaluation: 2 and 3 ranks over loopback Gloo return exactly the
// single-process latents (each rank denoises whole batches of the single-process sequence; every
// rank gets all of them) and the single-process evaluation repeats (each rank runs its share).
#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "mdd/diffusion/sampler.h"
#include "mdd/dist/process_group.h"
#include "mdd/eval/evaluator.h"
#include "mdd/models/dit.h"
#include "mdd/util/error.h"
#include "mdd/util/threads.h"
#include "dist_spawn.h"
#include "test_util.h"

using namespace mdd;
using mdd::dist::DistOptions;
using mdd::dist::ProcessGroup;

namespace {

// 10 images in batches of 4: 3 batches, the last one short, so ranks get unequal shares.
constexpr int64_t kImages = 10;

torch::Tensor sample_with(ProcessGroup pg) {
  // The same kernels and blocking in every process: LibTorch's threads and the BLAS library's
  // (OpenBLAS splits a product differently with 1 or 2 threads on some CPUs).
  mdd::set_num_threads(1);
  DiT m(DiTOptions(8, 2, 1, 32, 2, 2).num_classes(3));
  auto gen = at::detail::createCPUGenerator(5);
  m->initialize_weights(gen);
  {
    torch::NoGradGuard ng;
    for (auto& p : m->parameters()) p.add_(torch::randn(p.sizes(), gen) * 0.05);
  }
  m->eval();
  Sampler s([m](const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& y) mutable { return m->forward(x, t, y); },
            SamplerOptions()
                .batch_size(4)
                .timestep_respacing("8")
                .cfg_scale(2.0)
                .null_class(3)
                .guidance(CfgGuidance::kAllEpsChannels)
                .latent_shape({1, 8, 8})
                .seed(11)
                .process_group(pg));
  const torch::Tensor labels = torch::arange(kImages, torch::kInt64).remainder(3);
  return s.sample(labels, torch::arange(kImages, torch::kInt64) * 7 + 1);
}

// 3 classes of 16x16 images with a bright square per class (learnable in a few epochs).
LabeledImages toy_set(int64_t per_class, uint64_t seed) {
  const int64_t n = 3 * per_class;
  auto g = at::detail::createCPUGenerator(seed);
  auto img = torch::rand({n, 16, 16, 1}, g) * 60;
  auto labels = torch::arange(n, torch::kInt64).remainder(3);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = labels[i].item<int64_t>();
    img[i].slice(0, 2 + 4 * c, 8 + 4 * c).slice(1, 2 + 4 * c, 8 + 4 * c) += 180;
  }
  return {img.clamp(0, 255).to(torch::kUInt8), labels, {"a", "b", "c"}};
}

// Two sets with 3 and 2 repeats: 5 jobs, so with 2 or 3 ranks a rank's jobs cross the set boundary.
struct EvalCase {
  EvalOptions a = EvalOptions().protocol("dc").net("convnet2").width(8).epochs(3).repeats(3).seed(5).batch_size(8);
  EvalOptions b = EvalOptions(a).repeats(2).seed(11);
  LabeledImages train_a = shuffled(toy_set(6, 1), 3), train_b = shuffled(toy_set(5, 4), 7), test = toy_set(20, 2);

  // Training labels shuffled: what the network learns, and so its test accuracy, depends on its seed.
  static LabeledImages shuffled(LabeledImages d, uint64_t seed) {
    d.labels = d.labels.index_select(0, torch::randperm(d.labels.size(0), at::detail::createCPUGenerator(seed)));
    return d;
  }
  std::vector<EvalResult> run(const ProcessGroup& pg, const std::string& repeat_dir = "") const {
    torch::set_num_threads(1);
    return evaluate_sets({EvalSet{&train_a, a, "a"}, EvalSet{&train_b, b, "b"}}, test, pg, {}, repeat_dir);
  }
};

bool same_repeats(const std::vector<EvalResult>& x, const std::vector<EvalResult>& y) {
  if (x.size() != y.size()) return false;
  for (size_t k = 0; k < x.size(); ++k)
    if (x[k].best != y[k].best || x[k].last != y[k].last) return false;
  return true;
}

}  // namespace

// The other ranks of the evaluation test.
TEST(DistEvalChild, Run) {
  if (!std::getenv("MDD_DIST_CHILD")) GTEST_SKIP() << "helper of DistEval.ShardedRepeatsEqualOneProcess";
  ProcessGroup pg(DistOptions::from_env());
  const EvalCase c;
  const auto sharded = c.run(pg);
  Evaluator(c.a).run(c.train_a, c.test, pg);  // collective: the parent's one-set check
  if (!same_repeats(sharded, c.run(ProcessGroup()))) std::_Exit(4);
}

TEST(DistEval, ShardedRepeatsEqualOneProcess) {
  if (!dist::distributed_available()) GTEST_SKIP() << "built without c10d/Gloo (MDD_WITH_DIST)";
  const int threads = torch::get_num_threads();
  const EvalCase c;
  const std::vector<EvalResult> one = c.run(ProcessGroup());
  ASSERT_EQ(one.size(), 2u);
  ASSERT_EQ(one[0].best.size(), 3u);
  ASSERT_EQ(one[1].best.size(), 2u);
  // One process: each set's result is that of its own Evaluator.
  EXPECT_EQ(one[0].best, Evaluator(c.a).run(c.train_a, c.test).best);
  EXPECT_EQ(one[1].last, Evaluator(c.b).run(c.train_b, c.test).last);
  // The repeats must differ (distinct seeds), or a rank that ran the wrong repeat would go unnoticed.
  EXPECT_FALSE(one[0].best[0] == one[0].best[1] && one[0].best[1] == one[0].best[2])
      << "repeats gave identical accuracies " << one[0].best[0];
  for (int world : {2, 3}) {
    const int port = mdd_test::free_port();
    std::vector<pid_t> kids;
    for (int r = 1; r < world; ++r) kids.push_back(mdd_test::spawn_rank("DistEvalChild.Run", r, world, port));
    std::vector<EvalResult> sharded;
    try {
      ProcessGroup pg(DistOptions().rank(0).world_size(world).master_port(port).timeout(std::chrono::seconds(20)));
      sharded = c.run(pg);
      // Evaluator::run with a group is the one-set case.
      const EvalResult single = Evaluator(c.a).run(c.train_a, c.test, pg);
      EXPECT_EQ(single.best, one[0].best) << world << " ranks, Evaluator::run";
    } catch (const std::exception& e) {
      ADD_FAILURE() << e.what();
    }
    for (pid_t k : kids) EXPECT_EQ(mdd_test::wait_child(k, 60), 0) << "a rank of the " << world << "-process run failed";
    ASSERT_EQ(sharded.size(), 2u) << world << " ranks";
    for (size_t k = 0; k < 2; ++k) {
      EXPECT_EQ(sharded[k].best, one[k].best) << world << " ranks, set " << k;
      EXPECT_EQ(sharded[k].last, one[k].last) << world << " ranks, set " << k;
      EXPECT_DOUBLE_EQ(sharded[k].mean, one[k].mean);
      EXPECT_DOUBLE_EQ(sharded[k].std, one[k].std);
    }
  }
  torch::set_num_threads(threads);
}

// The other rank of the resume test: the kept repeats come from the parent's folder.
TEST(DistEvalChild, Resume) {
  if (!std::getenv("MDD_DIST_CHILD")) GTEST_SKIP() << "helper of DistEval.ResumesFromKeptRepeats";
  ProcessGroup pg(DistOptions::from_env());
  const EvalCase c;
  const auto resumed = c.run(pg, std::getenv("MDD_TEST_REPEAT_DIR"));
  if (!same_repeats(resumed, c.run(ProcessGroup())) || resumed[0].reused != 2 || resumed[1].reused != 1) std::_Exit(4);
}

// A folder with 3 of the 5 repeats kept: 2 ranks share only the 2 missing ones, every rank returns
// the single-process result, and the folder is whole again.
TEST(DistEval, ResumesFromKeptRepeats) {
  if (!dist::distributed_available()) GTEST_SKIP() << "built without c10d/Gloo (MDD_WITH_DIST)";
  namespace fs = std::filesystem;
  const int threads = torch::get_num_threads();
  const EvalCase c;
  const std::string dir = mdd_test::tmp_dir("dist_eval_resume");
  const std::vector<EvalResult> one = c.run(ProcessGroup(), dir);
  auto files = [&] {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    return names;
  };
  const std::vector<std::string> all = files();
  ASSERT_EQ(all.size(), 5u);
  // Set a keeps seeds 5 and 7 (its second repeat is missing), set b keeps seed 11 (its second is missing).
  int removed = 0;
  for (const auto& n : all) {
    if (n.rfind("a-s6-", 0) == 0 || n.rfind("b-s12-", 0) == 0) {
      fs::remove(fs::path(dir) / n);
      ++removed;
    }
  }
  ASSERT_EQ(removed, 2);
  const int port = mdd_test::free_port();
  const pid_t kid = mdd_test::spawn_rank("DistEvalChild.Resume", 1, 2, port, {"MDD_TEST_REPEAT_DIR=" + dir});
  std::vector<EvalResult> resumed;
  try {
    ProcessGroup pg(DistOptions().rank(0).world_size(2).master_port(port).timeout(std::chrono::seconds(20)));
    resumed = c.run(pg, dir);
  } catch (const std::exception& e) {
    ADD_FAILURE() << e.what();
  }
  EXPECT_EQ(mdd_test::wait_child(kid, 60), 0) << "the other rank failed or disagreed";
  ASSERT_EQ(resumed.size(), 2u);
  EXPECT_TRUE(same_repeats(resumed, one));
  EXPECT_EQ(resumed[0].reused, 2);
  EXPECT_EQ(resumed[1].reused, 1);
  EXPECT_EQ(files(), all) << "each rank wrote the repeat it ran";
  torch::set_num_threads(threads);
}

TEST(DistSampleChild, Run) {
  if (!std::getenv("MDD_DIST_CHILD")) GTEST_SKIP() << "helper of DistSample.ShardedSamplingIsBitIdentical";
  ProcessGroup pg(DistOptions::from_env());
  const torch::Tensor sharded = sample_with(pg);
  if (!torch::equal(sharded, sample_with(ProcessGroup()))) std::_Exit(4);
}

TEST(DistSample, ShardedSamplingIsBitIdentical) {
  if (!dist::distributed_available()) GTEST_SKIP() << "built without c10d/Gloo (MDD_WITH_DIST)";
  const int threads = torch::get_num_threads();
  const torch::Tensor one = sample_with(ProcessGroup());
  ASSERT_EQ(one.size(0), kImages);
  for (int world : {2, 3}) {
    const int port = mdd_test::free_port();
    std::vector<pid_t> kids;
    for (int r = 1; r < world; ++r) kids.push_back(mdd_test::spawn_rank("DistSampleChild.Run", r, world, port));
    torch::Tensor sharded;
    try {
      ProcessGroup pg(DistOptions().rank(0).world_size(world).master_port(port).timeout(std::chrono::seconds(20)));
      sharded = sample_with(pg);
    } catch (const std::exception& e) {
      ADD_FAILURE() << e.what();
    }
    for (pid_t k : kids) EXPECT_EQ(mdd_test::wait_child(k, 60), 0) << "a rank of the " << world << "-process run failed";
    ASSERT_TRUE(sharded.defined());
    EXPECT_TRUE(torch::equal(sharded, one)) << world << " ranks: largest difference "
                                            << (sharded - one).abs().max().item<double>();
  }
  torch::set_num_threads(threads);
}
