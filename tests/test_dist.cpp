// The process-group layer: one process (identity collectives), the launcher environment, and real
// groups of 2 and 3 processes over loopback Gloo (this test binary re-executed as the other ranks).
#include <chrono>
#include <cstdlib>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "mdd/dist/process_group.h"
#include "mdd/util/error.h"
#include "dist_spawn.h"

using namespace mdd;
using mdd::dist::DistOptions;
using mdd::dist::ProcessGroup;
using mdd_test::free_port;
using mdd_test::spawn_rank;
using mdd_test::wait_child;

namespace {

// Sets (or with nullptr unsets) environment variables for one scope.
class ScopedEnv {
 public:
  ScopedEnv(std::initializer_list<std::pair<const char*, const char*>> vars) {
    for (const auto& [k, v] : vars) {
      const char* old = std::getenv(k);
      saved_.emplace_back(k, old ? std::optional<std::string>(old) : std::nullopt);
      if (v)
        ::setenv(k, v, 1);
      else
        ::unsetenv(k);
    }
  }
  ~ScopedEnv() {
    for (const auto& [k, v] : saved_) {
      if (v)
        ::setenv(k.c_str(), v->c_str(), 1);
      else
        ::unsetenv(k.c_str());
    }
  }

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

const std::initializer_list<std::pair<const char*, const char*>> kNoLauncher = {
    {"RANK", nullptr},         {"WORLD_SIZE", nullptr},    {"LOCAL_RANK", nullptr},       {"MASTER_ADDR", nullptr},
    {"MASTER_PORT", nullptr},  {"SLURM_NTASKS", nullptr},  {"SLURM_PROCID", nullptr},     {"SLURM_LOCALID", nullptr},
    {"MDD_DIST_TIMEOUT_S", nullptr}, {"MDD_DIST_NCCL", nullptr}};

// What every rank of a group does; throws (gtest assertions do not cross processes) on a mismatch.
void exercise_group(ProcessGroup& pg) {
  const int64_t r = pg.rank(), w = pg.world_size();
  auto require = [&](bool ok, const std::string& what) {
    if (!ok) throw std::runtime_error("rank " + std::to_string(r) + ": " + what);
  };
  std::vector<torch::Tensor> ts{torch::full({4}, double(r + 1)), torch::arange(3, torch::kInt64) * (r + 1)};
  pg.all_reduce_sum(ts);
  const double sum = double(w * (w + 1) / 2);
  require(torch::equal(ts[0], torch::full({4}, sum)), "all_reduce_sum float");
  require(torch::equal(ts[1], torch::arange(3, torch::kInt64) * int64_t(sum)), "all_reduce_sum int64");
  std::vector<torch::Tensor> m{torch::full({2, 2}, double(r), torch::kFloat64)};
  pg.all_reduce_mean(m);
  require(torch::allclose(m[0], torch::full({2, 2}, double(w - 1) / 2, torch::kFloat64)), "all_reduce_mean");
  // Non-contiguous input: travels through a contiguous copy and lands back in the view.
  torch::Tensor base = torch::zeros({3, 2});
  torch::Tensor col = base.select(1, 1);
  col.fill_(1.0);
  std::vector<torch::Tensor> v{col};
  pg.all_reduce_sum(v);
  require(torch::equal(base.select(1, 1), torch::full({3}, double(w))) && torch::equal(base.select(1, 0), torch::zeros({3})),
          "all_reduce of a strided view");
  const torch::Tensor g = pg.all_gather(torch::full({2, 3}, r, torch::kInt64));
  require(g.sizes() == torch::IntArrayRef({2 * w, 3}), "all_gather shape");
  for (int64_t k = 0; k < w; ++k) require(torch::equal(g.slice(0, 2 * k, 2 * k + 2), torch::full({2, 3}, k, torch::kInt64)), "all_gather order");
  torch::Tensor b = torch::full({5}, double(r));
  pg.broadcast(b, w - 1);
  require(torch::equal(b, torch::full({5}, double(w - 1))), "broadcast");
  pg.barrier();
  // CUDA tensors: NCCL where this build and machine have it (one GPU per rank), else host copies
  // over Gloo. Joining bound this rank to its GPU.
  const bool gpu = torch::cuda::is_available();
  require(pg.uses_nccl() == (w > 1 && dist::nccl_available() && gpu), "uses_nccl");
  if (gpu) {
    const auto gpus = static_cast<int64_t>(torch::cuda::device_count());
    require(c10::impl::getDeviceGuardImpl(c10::kCUDA)->getDevice().index() == r % gpus, "bound to cuda:<local_rank>");
    if (!pg.uses_nccl() || gpus >= w) {  // NCCL needs a GPU of its own per rank
      const torch::Device cuda(torch::kCUDA);
      std::vector<torch::Tensor> c{torch::full({3}, double(r + 1), cuda), torch::full({2}, r + 1, torch::kInt64).to(cuda)};
      pg.all_reduce_sum(c);
      require(c[0].is_cuda() && torch::equal(c[0].cpu(), torch::full({3}, sum)), "all_reduce_sum on CUDA");
      require(torch::equal(c[1].cpu(), torch::full({2}, int64_t(sum), torch::kInt64)), "all_reduce_sum int64 on CUDA");
      const torch::Tensor cg = pg.all_gather(torch::full({1, 2}, double(r), cuda));
      require(cg.is_cuda() && torch::equal(cg.cpu().select(1, 0), torch::arange(double(w))), "all_gather on CUDA");
      torch::Tensor cb = torch::full({4}, double(r), cuda);
      pg.broadcast(cb, 0);
      require(torch::equal(cb.cpu(), torch::zeros({4})), "broadcast on CUDA");
    }
  }
  pg.check_same("the config", "same text");
  bool threw = false;
  try {
    pg.check_same("the config", r == w - 1 ? "other text" : "same text");
  } catch (const Error& e) {
    threw = std::string(e.what()).find("the config differs between rank 0 and rank " + std::to_string(w - 1)) !=
            std::string::npos;
  }
  require(threw, "check_same detects a differing rank");
}

}  // namespace

TEST(Dist, SingleProcessCollectivesAreTheIdentity) {
  ScopedEnv clean(kNoLauncher);
  ProcessGroup pg(DistOptions::from_env());
  EXPECT_EQ(pg.rank(), 0);
  EXPECT_EQ(pg.world_size(), 1);
  EXPECT_FALSE(pg.uses_nccl());  // one process: no backend at all
  EXPECT_TRUE(pg.is_main());
  std::vector<torch::Tensor> ts{torch::arange(4.0)};
  pg.all_reduce_sum(ts);
  pg.all_reduce_mean(ts);
  EXPECT_TRUE(torch::equal(ts[0], torch::arange(4.0)));
  EXPECT_TRUE(torch::equal(pg.all_gather(torch::ones({2, 3})), torch::ones({2, 3})));
  torch::Tensor b = torch::full({2}, 7.0);
  pg.broadcast(b);
  EXPECT_TRUE(torch::equal(b, torch::full({2}, 7.0)));
  pg.barrier();
  pg.check_same("config", "anything");
  EXPECT_THROW(pg.broadcast(b, 1), Error);
  std::vector<torch::Tensor> ints{torch::ones({2}, torch::kInt64)};
  EXPECT_THROW(pg.all_reduce_mean(ints), Error);
}

TEST(Dist, OptionsFromTheLauncherEnvironment) {
  {
    ScopedEnv clean(kNoLauncher);
    ScopedEnv env({{"RANK", "2"}, {"WORLD_SIZE", "4"}, {"LOCAL_RANK", "0"}, {"MASTER_ADDR", "node7"},
                   {"MASTER_PORT", "1234"}, {"MDD_DIST_TIMEOUT_S", "9"}});
    const DistOptions o = DistOptions::from_env();
    EXPECT_EQ(o.rank(), 2);
    EXPECT_EQ(o.world_size(), 4);
    EXPECT_EQ(o.local_rank(), 0);
    EXPECT_EQ(o.master_addr(), "node7");
    EXPECT_EQ(o.master_port(), 1234);
    EXPECT_EQ(o.timeout(), std::chrono::seconds(9));
    EXPECT_TRUE(o.nccl());
  }
  {
    ScopedEnv clean(kNoLauncher);
    ScopedEnv env({{"MDD_DIST_NCCL", "0"}});
    EXPECT_FALSE(DistOptions::from_env().nccl());
  }
  {
    ScopedEnv clean(kNoLauncher);
    ScopedEnv env({{"SLURM_PROCID", "5"}, {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"}, {"MASTER_ADDR", "n1"}});
    const DistOptions o = DistOptions::from_env();
    EXPECT_EQ(o.rank(), 5);
    EXPECT_EQ(o.world_size(), 8);
    EXPECT_EQ(o.local_rank(), 1);
  }
  for (auto [k, v] : {std::pair<const char*, const char*>{"WORLD_SIZE", "two"}, {"WORLD_SIZE", "0"},
                      {"MASTER_PORT", "70000"}, {"RANK", "-1"}, {"MDD_DIST_TIMEOUT_S", "1e3"},
                      {"MDD_DIST_NCCL", "2"}}) {
    ScopedEnv clean(kNoLauncher);
    ScopedEnv env({{"RANK", "0"}, {"WORLD_SIZE", "2"}, {k, v}});
    try {
      DistOptions::from_env();
      ADD_FAILURE() << k << "=" << v << " was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(k), std::string::npos) << e.what();
    }
  }
  {
    ScopedEnv clean(kNoLauncher);
    ScopedEnv env({{"WORLD_SIZE", "2"}});
    EXPECT_THROW(DistOptions::from_env(), Error);  // which rank am I?
  }
  EXPECT_THROW(ProcessGroup(DistOptions().world_size(2).rank(2)), Error);
  EXPECT_THROW(ProcessGroup(DistOptions().world_size(0)), Error);
  EXPECT_THROW(ProcessGroup(DistOptions().world_size(2).rank(0).master_port(0)), Error);
}

// The other ranks of the multi-process tests (run only when spawned by them).
TEST(DistChild, Collectives) {
  if (!std::getenv("MDD_DIST_CHILD")) GTEST_SKIP() << "helper of Dist.CollectivesAcrossTwoAndThreeProcesses";
  ProcessGroup pg(DistOptions::from_env());
  exercise_group(pg);
}

TEST(DistChild, JoinThenDie) {
  if (!std::getenv("MDD_DIST_CHILD")) GTEST_SKIP() << "helper of Dist.ADeadPeerIsAnErrorNotAHang";
  ProcessGroup pg(DistOptions::from_env());
  std::_Exit(3);
}

TEST(Dist, CollectivesAcrossTwoAndThreeProcesses) {
  if (!dist::distributed_available()) GTEST_SKIP() << "built without c10d/Gloo (MDD_WITH_DIST)";
  for (int world : {2, 3}) {
    const int port = free_port();
    ASSERT_GT(port, 0);
    std::vector<pid_t> kids;
    for (int r = 1; r < world; ++r) kids.push_back(spawn_rank("DistChild.Collectives", r, world, port));
    for (pid_t k : kids) ASSERT_GT(k, 0);
    ProcessGroup pg(DistOptions().rank(0).world_size(world).master_port(port).timeout(std::chrono::seconds(20)));
    EXPECT_EQ(pg.world_size(), world);
    try {
      exercise_group(pg);
    } catch (const std::exception& e) {
      ADD_FAILURE() << e.what();
    }
    for (pid_t k : kids) EXPECT_EQ(wait_child(k, 60), 0) << "a rank of the " << world << "-process group failed";
  }
}

TEST(Dist, ADeadPeerIsAnErrorNotAHang) {
  if (!dist::distributed_available()) GTEST_SKIP() << "built without c10d/Gloo (MDD_WITH_DIST)";
  const int port = free_port();
  const pid_t kid = spawn_rank("DistChild.JoinThenDie", 1, 2, port);
  ASSERT_GT(kid, 0);
  ProcessGroup pg(DistOptions().rank(0).world_size(2).master_port(port).timeout(std::chrono::seconds(15)));
  EXPECT_EQ(wait_child(kid, 60), 3);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<torch::Tensor> ts{torch::ones({8})};
  try {
    pg.all_reduce_sum(ts);
    ADD_FAILURE() << "an all_reduce with a dead peer returned";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("all_reduce failed on rank 0 of 2"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 16.0);
}

// Rank 1 of Dist.ALongBarrierOutlastsTheGroupTimeout: waits in barrier(60 s) while rank 0 works
// past the group's 3 s timeout, then checks that the group still runs collectives.
TEST(DistChild, LongWait) {
  if (!std::getenv("MDD_DIST_CHILD")) GTEST_SKIP() << "helper of Dist.ALongBarrierOutlastsTheGroupTimeout";
  ProcessGroup pg(DistOptions::from_env().timeout(std::chrono::seconds(3)));
  const auto t0 = std::chrono::steady_clock::now();
  pg.barrier(std::chrono::seconds(60));
  if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < 5.0) std::_Exit(5);
  std::vector<torch::Tensor> ts{torch::ones({4})};
  pg.all_reduce_sum(ts);
  if (ts[0][0].item<float>() != 2.0f) std::_Exit(6);
}

// The barrier with its own limit (`on_main` waits with it while rank 0 encodes a dataset alone)
// holds past the group's collective timeout: with Gloo's barrier the waiting rank failed after
// DistOptions::timeout (the demo's latents took longer than 5 minutes on a loaded machine).
TEST(Dist, ALongBarrierOutlastsTheGroupTimeout) {
  if (!dist::distributed_available()) GTEST_SKIP() << "built without c10d/Gloo (MDD_WITH_DIST)";
  const int port = free_port();
  const pid_t kid = spawn_rank("DistChild.LongWait", 1, 2, port);
  ASSERT_GT(kid, 0);
  try {
    ProcessGroup pg(DistOptions().rank(0).world_size(2).master_port(port).timeout(std::chrono::seconds(3)));
    std::this_thread::sleep_for(std::chrono::seconds(7));  // "a long job alone", over twice the timeout
    pg.barrier(std::chrono::seconds(60));
    std::vector<torch::Tensor> ts{torch::ones({4})};
    pg.all_reduce_sum(ts);
    EXPECT_EQ(ts[0][0].item<float>(), 2.0f);
  } catch (const std::exception& e) {
    ADD_FAILURE() << e.what();
  }
  EXPECT_EQ(wait_child(kid, 60), 0) << "rank 1 failed (5: did not wait, 6: the group was broken after the wait)";
}

TEST(Dist, ARankThatNeverComesTimesOut) {
  if (!dist::distributed_available()) GTEST_SKIP() << "built without c10d/Gloo (MDD_WITH_DIST)";
  const auto t0 = std::chrono::steady_clock::now();
  try {
    ProcessGroup pg(DistOptions().rank(0).world_size(2).master_port(free_port()).timeout(std::chrono::seconds(2)));
    ADD_FAILURE() << "joined a group whose other rank never started";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("could not join"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 30.0);
}
