// Sharded sampling: 2 and 3 ranks over loopback Gloo return exactly the single-process latents
// (each rank denoises whole batches of the single-process sequence; every rank gets all of them).
#include <cstdlib>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "mdd/diffusion/sampler.h"
#include "mdd/dist/process_group.h"
#include "mdd/models/dit.h"
#include "mdd/util/error.h"
#include "dist_spawn.h"

using namespace mdd;
using mdd::dist::DistOptions;
using mdd::dist::ProcessGroup;

namespace {

// 10 images in batches of 4: 3 batches, the last one short, so ranks get unequal shares.
constexpr int64_t kImages = 10;

torch::Tensor sample_with(ProcessGroup pg) {
  torch::set_num_threads(1);  // the same kernels and blocking in every process
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

}  // namespace

// The other ranks: each also samples alone and fails unless the two results are identical.
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
