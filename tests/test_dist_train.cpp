// Data-parallel fine-tuning over loopback Gloo: 2 and 3 processes give the single-process run at the
// same global batch, checkpoints resume with another world size, a mismatched configuration is
// refused on every rank at start, and a rank that dies mid-run stops the others with an error.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "mdd/data/latent_cache.h"
#include "mdd/data/training_data.h"
#include "mdd/dist/process_group.h"
#include "mdd/io/state_dict.h"
#include "mdd/models/codec.h"
#include "mdd/train/checkpoint.h"
#include "mdd/train/finetune.h"
#include "mdd/train/vae_trainer.h"
#include "mdd/util/error.h"
#include "dist_spawn.h"
#include "test_util.h"
#include "tiny_training.h"

using namespace mdd;
using mdd::dist::DistOptions;
using mdd::dist::ProcessGroup;
using mdd_test::tiny_data;
using mdd_test::tiny_dit;

namespace {

// Parameters after K steps agree with the single-process run to float summation order only: the
// batch's mean loss and the weight gradients are summed per rank, then across ranks. Measured
// (Debian LibTorch 1.13): largest |difference| over every parameter, EMA entry and memory item
// 4e-6 with 2 ranks and 1.5e-5 with 3, both in generated-memory items of magnitude 138 / 327
// (relative 5e-8). Without the W factor on the minimax term the difference is 0.09.
constexpr double kAtol = 2e-5;
constexpr double kRtol = 1e-4;

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : fallback;
}

// DiffFit + minimax with strong terms (they must shape the gradients), batch 6 (2 and 3 ranks).
FinetuneOptions options(const ProcessGroup& pg, int64_t steps, const std::string& ckpt_dir = "") {
  return FinetuneOptions()
      .steps(steps)
      .batch_size(6)
      .memory_size(4)
      .gamma_blocks(1)
      .lambda_r(0.3)
      .lambda_d(0.7)
      .ckpt_every(ckpt_dir.empty() ? 0 : 1)
      .checkpoint_dir(ckpt_dir)
      .keep_checkpoints(0)
      .process_group(pg);
}

// Everything a run ends with: model, EMA and both memories.
io::TensorMap final_state(Finetuner& ft) {
  io::TensorMap m = with_prefix(state_dict(*ft.model()), "model.");
  for (auto& kv : with_prefix(state_dict(*ft.ema()), "ema.")) m.emplace(kv);
  for (auto& kv : ft.real_memory().state("real.")) m.emplace(kv);
  for (auto& kv : ft.generated_memory().state("gen.")) m.emplace(kv);
  return m;
}

// Largest |a - b| over all entries; "" or the first key that is missing or out of tolerance.
std::string compare(const io::TensorMap& a, const io::TensorMap& b, double* max_diff, std::string* where = nullptr) {
  *max_diff = 0;
  if (a.size() != b.size()) return "entry count " + std::to_string(a.size()) + " vs " + std::to_string(b.size());
  for (const auto& kv : a) {
    auto it = b.find(kv.first);
    if (it == b.end()) return "missing " + kv.first;
    if (kv.second.sizes() != it->second.sizes()) return "shape of " + kv.first;
    if (!kv.second.is_floating_point()) {
      if (!torch::equal(kv.second, it->second)) return "integer entry " + kv.first;
      continue;
    }
    const auto x = kv.second.to(torch::kFloat64), y = it->second.to(torch::kFloat64);
    const double d = (x - y).abs().max().item<double>();
    if (d > *max_diff && where) *where = kv.first + " (|value| up to " + std::to_string(y.abs().max().item<double>()) + ")";
    *max_diff = std::max(*max_diff, d);
    if (!torch::allclose(x, y, kRtol, kAtol)) return kv.first;
  }
  return "";
}

// A checksum of every parameter of model and EMA: must be bit-identical on all ranks.
torch::Tensor checksum(Finetuner& ft) {
  std::vector<torch::Tensor> parts;
  for (const auto& p : ft.model()->parameters()) parts.push_back(p.detach().to(torch::kFloat64).sum().reshape({1}));
  for (const auto& p : ft.ema()->parameters()) parts.push_back(p.detach().to(torch::kFloat64).sum().reshape({1}));
  return torch::cat(parts).reshape({1, -1});
}

// What every rank runs (rank 0 in the test itself, the others as spawned children): MDD_TEST_DIR,
// MDD_TEST_STEPS, MDD_TEST_CKPT (checkpoint dir, resume first), MDD_TEST_LR (a deliberately
// different lr), MDD_TEST_DIE_AFTER (exit after that many steps), MDD_TEST_BATCH. Rank r
// initialises its model with seed 1 + r: the trainer must start all from rank 0's weights.
struct RankRun {
  io::TensorMap state;
  torch::Tensor checksums;  // [world, n] from every rank
  std::vector<double> losses;
  int64_t overlapped = 0, buckets = 0;  // gradient buckets of the last step: started during the backward / all
};

// How the gradients are averaged (MDD_TEST_OVERLAP, MDD_TEST_BUCKET in the children).
struct Reduce {
  bool overlap = true;
  int64_t bucket_bytes = int64_t(25) << 20;
  std::vector<std::string> env() const {
    return {"MDD_TEST_OVERLAP=" + std::string(overlap ? "1" : "0"), "MDD_TEST_BUCKET=" + std::to_string(bucket_bytes)};
  }
};

RankRun run_rank(ProcessGroup pg, const std::string& dir, int64_t steps, const std::string& ckpt,
                 double lr = 1e-3, int64_t die_after = -1, int64_t batch = 6, const Reduce& reduce = {}) {
  // Each rank builds its own cache file; rank r initialises its model with seed 1 + r (the trainer
  // must start all from rank 0's weights).
  auto data = tiny_data(dir + "/rank" + std::to_string(pg.rank()));
  Finetuner ft(tiny_dit(1 + uint64_t(pg.rank())), data,
               options(pg, steps, ckpt).lr(lr).batch_size(batch).overlap_grad_reduce(reduce.overlap)
                   .grad_bucket_bytes(reduce.bucket_bytes));
  ft.resume();
  RankRun out;
  while (ft.step_count() < steps) {
    const TrainStats st = ft.step();
    out.losses.push_back(st.loss);
    out.overlapped = st.overlapped_buckets;
    out.buckets = st.grad_buckets;
    if (!ckpt.empty()) ft.save_checkpoint();
    if (die_after >= 0 && ft.step_count() == die_after) std::_Exit(3);
  }
  out.state = final_state(ft);
  out.checksums = pg.all_gather(checksum(ft));
  return out;
}

// Runs `world` ranks: children 1..world-1 spawned, rank 0 here. Returns rank 0's run; children's
// exit codes go to `codes`.
RankRun run_group(int world, const std::string& dir, int64_t steps, const std::string& ckpt,
                  std::vector<int>* codes, std::vector<std::string> child_env = {}, int64_t batch = 6,
                  const Reduce& reduce = {}) {
  const int port = mdd_test::free_port();
  std::vector<std::string> env = {"MDD_TEST_DIR=" + dir, "MDD_TEST_STEPS=" + std::to_string(steps),
                                  "MDD_TEST_CKPT=" + ckpt};
  env.insert(env.end(), child_env.begin(), child_env.end());
  for (const auto& e : reduce.env()) env.push_back(e);
  std::vector<pid_t> kids;
  for (int r = 1; r < world; ++r) kids.push_back(mdd_test::spawn_rank("DistTrainChild.Run", r, world, port, env));
  RankRun run;
  std::exception_ptr failed;
  try {
    ProcessGroup pg(DistOptions().rank(0).world_size(world).master_port(port).timeout(std::chrono::seconds(20)));
    run = run_rank(pg, dir, steps, ckpt, 1e-3, -1, batch, reduce);
  } catch (...) {
    failed = std::current_exception();
  }
  codes->clear();
  for (pid_t k : kids) codes->push_back(k > 0 ? mdd_test::wait_child(k, 120) : -2);
  if (failed) std::rethrow_exception(failed);
  return run;
}

RankRun single(const std::string& dir, int64_t steps, const std::string& ckpt = "") {
  return run_rank(ProcessGroup(), dir, steps, ckpt);
}

}  // namespace

// The other ranks (run only when spawned by the tests below).
TEST(DistTrainChild, Run) {
  if (!std::getenv("MDD_DIST_CHILD")) GTEST_SKIP() << "helper of the DistTrain tests";
  ProcessGroup pg(DistOptions::from_env());
  run_rank(pg, env_or("MDD_TEST_DIR", "/tmp"), std::stoll(env_or("MDD_TEST_STEPS", "1")), env_or("MDD_TEST_CKPT", ""),
           std::stod(env_or("MDD_TEST_LR", "0.001")), std::stoll(env_or("MDD_TEST_DIE_AFTER", "-1")),
           std::stoll(env_or("MDD_TEST_BATCH", "6")),
           Reduce{env_or("MDD_TEST_OVERLAP", "1") == "1", std::stoll(env_or("MDD_TEST_BUCKET", std::to_string(25 << 20)))});
}

TEST(DistTrain, TwoAndThreeRanksEqualOneProcess) {
  if (!dist::distributed_available()) GTEST_SKIP() << "built without c10d/Gloo (MDD_WITH_DIST)";
  const std::string dir = mdd_test::tmp_dir("dist_train_equal");
  const RankRun one = single(dir + "/one", 4);
  for (int world : {2, 3}) {
    std::vector<int> codes;
    const RankRun many = run_group(world, dir + "/w" + std::to_string(world), 4, "", &codes);
    for (int c : codes) EXPECT_EQ(c, 0) << "a rank of the " << world << "-process run failed";
    // Every rank ends with bit-identical weights (same averaged gradients, same EMA, same banks).
    ASSERT_EQ(many.checksums.size(0), world);
    for (int r = 1; r < world; ++r)
      EXPECT_TRUE(torch::equal(many.checksums[r], many.checksums[0])) << "rank " << r << " drifted from rank 0";
    double diff = 0;
    std::string where;
    EXPECT_EQ(compare(many.state, one.state, &diff, &where), "") << world << " ranks, largest difference " << diff;
    ASSERT_EQ(many.losses.size(), one.losses.size());
    for (size_t i = 0; i < one.losses.size(); ++i) EXPECT_NEAR(many.losses[i], one.losses[i], 1e-5) << "step " << i + 1;
    RecordProperty("max_abs_diff_w" + std::to_string(world), std::to_string(diff) + " at " + where);
  }
}

// Reducing buckets during the backward gives exactly the averages of reducing them after it: the
// same sums of the same values. Small buckets, so that several start while the backward runs.
TEST(DistTrain, OverlappedGradientReductionEqualsTheOneAfterTheBackward) {
  if (!dist::distributed_available()) GTEST_SKIP() << "built without c10d/Gloo (MDD_WITH_DIST)";
  const std::string dir = mdd_test::tmp_dir("dist_train_overlap");
  std::vector<int> codes;
  const RankRun after = run_group(2, dir + "/after", 3, "", &codes, {}, 6, Reduce{false, 256});
  for (int c : codes) EXPECT_EQ(c, 0);
  const RankRun during = run_group(2, dir + "/during", 3, "", &codes, {}, 6, Reduce{true, 256});
  for (int c : codes) EXPECT_EQ(c, 0);
  EXPECT_GT(during.buckets, 3);
  EXPECT_GT(during.overlapped, 0) << "no bucket started during the backward";
  EXPECT_EQ(after.overlapped, 0);
  ASSERT_EQ(after.state.size(), during.state.size());
  for (const auto& kv : after.state) EXPECT_TRUE(torch::equal(kv.second, during.state.at(kv.first))) << kv.first;
  EXPECT_EQ(after.losses, during.losses);
  RecordProperty("overlapped_buckets", std::to_string(during.overlapped) + " of " + std::to_string(during.buckets));
}

TEST(DistTrain, CheckpointsResumeWithAnotherWorldSize) {
  if (!dist::distributed_available()) GTEST_SKIP() << "built without c10d/Gloo (MDD_WITH_DIST)";
  const std::string dir = mdd_test::tmp_dir("dist_train_resume");
  const RankRun straight = single(dir + "/straight", 4);
  // 2 ranks write steps 1-2 (rank 0 only), one process continues to 4.
  std::vector<int> codes;
  run_group(2, dir + "/a", 2, dir + "/ckpt_a", &codes);
  for (int c : codes) EXPECT_EQ(c, 0);
  EXPECT_EQ(list_checkpoints(dir + "/ckpt_a").size(), 2u);
  const RankRun resumed_one = single(dir + "/a1", 4, dir + "/ckpt_a");
  double diff = 0;
  EXPECT_EQ(compare(resumed_one.state, straight.state, &diff), "") << "2 ranks -> 1, largest difference " << diff;
  // One process writes steps 1-2, 3 ranks continue to 4.
  single(dir + "/b", 2, dir + "/ckpt_b");
  const RankRun resumed_three = run_group(3, dir + "/b3", 4, dir + "/ckpt_b", &codes);
  for (int c : codes) EXPECT_EQ(c, 0);
  EXPECT_EQ(compare(resumed_three.state, straight.state, &diff), "") << "1 rank -> 3, largest difference " << diff;
}

TEST(DistTrain, AMismatchedConfigurationIsRefusedOnEveryRank) {
  if (!dist::distributed_available()) GTEST_SKIP() << "built without c10d/Gloo (MDD_WITH_DIST)";
  const std::string dir = mdd_test::tmp_dir("dist_train_mismatch");
  std::vector<int> codes;
  try {
    run_group(2, dir, 2, "", &codes, {"MDD_TEST_LR=0.002"});
    ADD_FAILURE() << "rank 0 trained although rank 1 has another learning rate";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("training configuration (options, model shape, data) differs between rank 0 and rank 1"),
              std::string::npos) << e.what();
  }
  ASSERT_EQ(codes.size(), 1u);
  EXPECT_NE(codes[0], 0) << "rank 1 must fail too";
  EXPECT_NE(codes[0], -1) << "rank 1 hung";
}

TEST(DistTrain, ARankThatDiesStopsTheOthersAndTheRunResumes) {
  if (!dist::distributed_available()) GTEST_SKIP() << "built without c10d/Gloo (MDD_WITH_DIST)";
  const std::string dir = mdd_test::tmp_dir("dist_train_die");
  const RankRun straight = single(dir + "/straight", 4);
  std::vector<int> codes;
  const auto t0 = std::chrono::steady_clock::now();
  try {
    run_group(2, dir + "/run", 4, dir + "/ckpt", &codes, {"MDD_TEST_DIE_AFTER=2"});
    ADD_FAILURE() << "rank 0 finished although rank 1 died after step 2";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("failed on rank 0 of 2"), std::string::npos) << e.what();
  }
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 60.0);
  ASSERT_EQ(codes.size(), 1u);
  EXPECT_EQ(codes[0], 3);
  // The run resumes (here in one process) from the last checkpoint rank 0 wrote and ends where the
  // uninterrupted run does.
  const auto cks = list_checkpoints(dir + "/ckpt");
  ASSERT_FALSE(cks.empty());
  EXPECT_EQ(cks.back().step, 2);
  const RankRun resumed = single(dir + "/again", 4, dir + "/ckpt");
  double diff = 0;
  EXPECT_EQ(compare(resumed.state, straight.state, &diff), "") << "largest difference " << diff;
}

TEST(DistTrain, ABatchThatDoesNotSplitEvenlyIsRefused) {
  if (!dist::distributed_available()) GTEST_SKIP() << "built without c10d/Gloo (MDD_WITH_DIST)";
  const std::string dir = mdd_test::tmp_dir("dist_train_split");
  std::vector<int> codes;
  try {
    run_group(2, dir, 1, "", &codes, {"MDD_TEST_BATCH=5"}, 5);
    ADD_FAILURE() << "batch 5 was accepted by 2 ranks";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("batch_size 5 is not a multiple of the 2 processes"), std::string::npos) << e.what();
  }
  ASSERT_EQ(codes.size(), 1u);
  EXPECT_NE(codes[0], 0);
  EXPECT_NE(codes[0], -1) << "rank 1 hung";
}

// ------------------------------------------------------------------ data-parallel VAE training

namespace {

// 3 joint steps, then (decoder_steps > 0) decoder-only ones, batch `batch`; returns the weights and
// checks on every rank that all ranks hold the same bits.
io::TensorMap vae_run(ProcessGroup pg, int64_t decoder_steps, int64_t batch = 6) {
  torch::set_num_threads(1);
  auto o = VaeTrainerOptions().steps(3).batch_size(batch).lr(1e-3).lr_warmup(1).ckpt_every(0).log_every(0).process_group(pg);
  // Each rank initialises from its own seed: the trainer must start all from rank 0's weights.
  torch::manual_seed(10 + uint64_t(pg.rank()));
  VaeTrainer joint(mdd_test::tiny_vae(), mdd_test::tiny_vae_images(), o);
  joint.train();
  AutoencoderKL vae = joint.vae();
  if (decoder_steps > 0) {
    VaeTrainer dec(vae, mdd_test::tiny_vae_images(), VaeTrainerOptions(o).steps(decoder_steps).train_encoder(false));
    dec.train();
    vae = dec.vae();
  }
  io::TensorMap state = state_dict(*vae);
  std::string bits;  // exact (hex-float) sums of every tensor
  for (const auto& kv : state) {
    char buf[80];
    const auto t = kv.second.to(torch::kFloat64);
    std::snprintf(buf, sizeof(buf), "%a/%a;", t.sum().item<double>(), (t * t).sum().item<double>());
    bits += buf;
  }
  pg.check_same("final VAE weights", bits);  // throws on every rank when any rank differs
  // The attention's key bias shifts every logit of a query by the same amount, so softmax makes its
  // true gradient exactly zero: what it gets is float noise, which Adam normalises into steps of
  // ~lr in the direction of that noise. It differs with any change of summation order (3e-5 to
  // 6e-5 measured), so it is left out of the comparison.
  for (auto it = state.begin(); it != state.end();)
    it = it->first.size() >= 9 && it->first.compare(it->first.size() - 9, 9, "to_k.bias") == 0 ? state.erase(it) : std::next(it);
  return state;
}

}  // namespace

TEST(DistVaeChild, Run) {
  if (!std::getenv("MDD_DIST_CHILD") || !std::getenv("MDD_VAE_DECODER_STEPS"))
    GTEST_SKIP() << "helper of DistVae.TwoAndThreeRanksEqualOneProcess";
  ProcessGroup pg(DistOptions::from_env());
  vae_run(pg, std::stoll(env_or("MDD_VAE_DECODER_STEPS", "0")), std::stoll(env_or("MDD_TEST_BATCH", "6")));
}

TEST(DistVae, TwoAndThreeRanksEqualOneProcess) {
  if (!dist::distributed_available()) GTEST_SKIP() << "built without c10d/Gloo (MDD_WITH_DIST)";
  const int threads = torch::get_num_threads();
  for (int64_t decoder_steps : {0, 2}) {
    const io::TensorMap one = vae_run(ProcessGroup(), decoder_steps);
    for (int world : {2, 3}) {
      if (decoder_steps > 0 && world == 3) continue;  // the decoder-only path once is enough
      const int port = mdd_test::free_port();
      std::vector<pid_t> kids;
      for (int r = 1; r < world; ++r)
        kids.push_back(mdd_test::spawn_rank("DistVaeChild.Run", r, world, port,
                                            {"MDD_VAE_DECODER_STEPS=" + std::to_string(decoder_steps)}));
      io::TensorMap many;
      try {
        ProcessGroup pg(DistOptions().rank(0).world_size(world).master_port(port).timeout(std::chrono::seconds(20)));
        many = vae_run(pg, decoder_steps);
      } catch (const std::exception& e) {
        ADD_FAILURE() << e.what();
      }
      for (pid_t k : kids) EXPECT_EQ(mdd_test::wait_child(k, 60), 0) << world << " ranks: a child failed";
      double diff = 0;
      std::string where;
      const std::string why = compare(one, many, &diff, &where);
      EXPECT_TRUE(why.empty()) << world << " ranks, decoder steps " << decoder_steps << ": " << why;
      std::printf("[ note ] VAE, %d ranks, %lld decoder steps: largest difference %.3g (%s)\n", world,
                  static_cast<long long>(decoder_steps), diff, where.c_str());
    }
  }
  // A batch that does not split into equal shares is refused on every rank.
  const int port = mdd_test::free_port();
  const pid_t kid = mdd_test::spawn_rank("DistVaeChild.Run", 1, 2, port, {"MDD_VAE_DECODER_STEPS=0", "MDD_TEST_BATCH=5"});
  try {
    ProcessGroup pg(DistOptions().rank(0).world_size(2).master_port(port).timeout(std::chrono::seconds(20)));
    vae_run(pg, 0, 5);
    ADD_FAILURE() << "batch 5 on 2 ranks was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("batch_size 5 is not a multiple of the 2 processes"), std::string::npos) << e.what();
  }
  EXPECT_NE(mdd_test::wait_child(kid, 60), 0);
  torch::set_num_threads(threads);
}
