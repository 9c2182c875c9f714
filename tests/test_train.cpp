// Fine-tuning loop: AdamW, EMA, checkpoints, the step's loss, memories, resume, NaN handling.
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <thread>

#include <gtest/gtest.h>

#include <functional>
#include <torch/torch.h>

#include "mdd/data/latent_cache.h"
#include "mdd/data/training_data.h"
#include "mdd/io/state_dict.h"
#include "mdd/minimax/minimax_loss.h"
#include "mdd/models/codec.h"
#include "mdd/models/difffit.h"
#include "mdd/train/adamw.h"
#include "mdd/train/checkpoint.h"
#include "mdd/train/ema.h"
#include "mdd/train/finetune.h"
#include "mdd/train/vae_trainer.h"
#include "mdd/util/error.h"
#include "test_util.h"
#include "tiny_training.h"

namespace fs = std::filesystem;
using namespace mdd;
using mdd_test::tiny_data;
using mdd_test::tiny_dit;
using mdd_test::tiny_vae;
using mdd_test::tiny_vae_images;
using mdd_test::tmp_dir;

namespace {

bool equal_maps(const io::TensorMap& a, const io::TensorMap& b, std::string* why) {
  if (a.size() != b.size()) {
    *why = "size " + std::to_string(a.size()) + " vs " + std::to_string(b.size());
    return false;
  }
  for (const auto& kv : a) {
    auto it = b.find(kv.first);
    if (it == b.end() || !torch::equal(kv.second, it->second)) {
      *why = kv.first;
      return false;
    }
  }
  return true;
}

FinetuneOptions tiny_options() {
  return FinetuneOptions().steps(6).batch_size(6).memory_size(4).gamma_blocks(1).lambda_r(0.3).lambda_d(0.7);
}

}  // namespace

TEST(AdamW, MatchesTorchAdamW) {
  auto gen = at::detail::createCPUGenerator(3);
  torch::Tensor a = torch::randn({5, 4}, gen).requires_grad_(true);
  torch::Tensor b = a.detach().clone().requires_grad_(true);
  AdamW mine({a}, AdamWOptions().lr(0.01).weight_decay(0.1));
  torch::optim::AdamW ref({b}, torch::optim::AdamWOptions(0.01).weight_decay(0.1));
  for (int i = 0; i < 5; ++i) {
    torch::Tensor target = torch::randn({5, 4}, gen);
    mine.zero_grad();
    ref.zero_grad();
    (a - target).pow(2).sum().backward();
    (b - target).pow(2).sum().backward();
    mine.step();
    ref.step();
  }
  EXPECT_TRUE(mdd_test::AllClose(a, b, 1e-6));
  EXPECT_GT((a - torch::randn({5, 4}, gen)).abs().sum().item<double>(), 0);
}

// The one-pass update (float32 contiguous CPU parameters) and the op-by-op form (anything else:
// here a transposed parameter, and float64) agree with torch::optim::AdamW, with weight decay, at
// several sizes (the one-pass loop's vector body and scalar tail).
TEST(AdamW, OnePassAndOpByOpAgreeWithTorch) {
  auto gen = at::detail::createCPUGenerator(5);
  for (const auto& make : std::vector<std::function<torch::Tensor()>>{
           [&] { return torch::randn({37}, gen); },
           [&] { return torch::randn({64, 33}, gen); },
           [&] { return torch::randn({33, 64}, gen).t(); },                      // not contiguous
           [&] { return torch::randn({19, 3}, gen).to(torch::kFloat64); }}) {  // not float32
    torch::Tensor a = make().requires_grad_(true);
    torch::Tensor b = a.detach().clone().requires_grad_(true);
    AdamW mine({a}, AdamWOptions().lr(0.02).weight_decay(0.05));
    torch::optim::AdamW ref({b}, torch::optim::AdamWOptions(0.02).weight_decay(0.05));
    for (int i = 0; i < 4; ++i) {
      const torch::Tensor target = torch::randn(a.sizes(), gen).to(a.scalar_type());
      mine.zero_grad();
      ref.zero_grad();
      (a - target).pow(3).sum().backward();
      (b - target).pow(3).sum().backward();
      mine.step();
      ref.step();
    }
    EXPECT_TRUE(mdd_test::AllClose(a.to(torch::kFloat32), b.to(torch::kFloat32), 1e-6)) << a.sizes();
    EXPECT_GT((a - make().to(a.scalar_type())).abs().sum().item<double>(), 0);
  }
}

TEST(AdamW, StateRoundTripAndValidation) {
  torch::Tensor p = torch::ones({3}).requires_grad_(true);
  AdamW opt({p});
  p.sum().backward();
  opt.step();
  auto st = opt.state("opt.");
  ASSERT_EQ(st.count("opt.0.exp_avg"), 1u);
  torch::Tensor q = torch::ones({3}).requires_grad_(true);
  AdamW opt2({q});
  opt2.load_state(st, "opt.");
  EXPECT_TRUE(torch::equal(opt2.state("opt.").at("opt.0.exp_avg_sq"), st.at("opt.0.exp_avg_sq")));
  st["opt.0.exp_avg"] = torch::zeros({4});
  EXPECT_THROW(opt2.load_state(st, "opt."), Error);
  st.erase("opt.0.exp_avg");
  st["opt.7.exp_avg"] = torch::zeros({3});
  EXPECT_THROW(opt2.load_state(st, "opt."), Error);
}

TEST(Ema, UpdateIsConvexCombinationOfAllParameters) {
  torch::nn::Linear a(3, 2), b(3, 2);
  a->weight.set_requires_grad(false);  // frozen parameters are averaged too (reference: all named params)
  const torch::Tensor ew = b->weight.detach().clone(), mw = a->weight.detach().clone();
  update_ema(*b, *a, 0.9);
  EXPECT_TRUE(mdd_test::AllClose(b->weight, 0.9 * ew + 0.1 * mw, 1e-7));
  update_ema(*b, *a, 0.0);
  EXPECT_TRUE(torch::equal(b->weight, a->weight));
  torch::nn::Linear c(4, 2);
  EXPECT_THROW(update_ema(*c, *a, 0.5), Error);
  EXPECT_THROW(update_ema(*b, *a, 1.5), Error);
}

TEST(Checkpoint, WriteListReadKeepLast) {
  const std::string dir = tmp_dir("ckpt_basic");
  for (int64_t s : {10, 20, 30}) write_checkpoint(dir, s, {{"x", torch::full({2}, double(s))}}, R"({"a": 1})", 2);
  auto all = list_checkpoints(dir);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].step, 20);
  EXPECT_EQ(all[1].step, 30);
  EXPECT_TRUE(fs::exists(dir + "/0000030.safetensors"));
  auto latest = read_latest_checkpoint(dir);
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->info.step, 30);
  EXPECT_EQ(latest->tensors.at("x")[0].item<double>(), 30.0);
  EXPECT_NE(latest->meta_json.find("\"a\""), std::string::npos);
  EXPECT_THROW(write_checkpoint(dir, 40, {}, "[1]"), Error);
}

TEST(Checkpoint, TruncatedNewestIsSkipped) {
  const std::string dir = tmp_dir("ckpt_trunc");
  write_checkpoint(dir, 1, {{"x", torch::ones({100})}});
  auto info = write_checkpoint(dir, 2, {{"x", torch::zeros({100})}});
  fs::resize_file(info.weights_path, fs::file_size(info.weights_path) - 10);
  EXPECT_THROW(read_checkpoint(info), Error);
  std::vector<std::string> skipped;
  auto latest = read_latest_checkpoint(dir, &skipped);
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->info.step, 1);
  ASSERT_EQ(skipped.size(), 1u);
  EXPECT_NE(skipped[0].find("0000002"), std::string::npos);
  // A weights file without its sidecar (killed before the JSON was written) is not a checkpoint.
  fs::remove(dir + "/0000001.json");
  io::save_safetensors(dir + "/0000003.safetensors", {{"x", torch::ones({1})}});
  std::ofstream(dir + "/junk.json") << "{";
  EXPECT_EQ(list_checkpoints(dir).size(), 1u);
  EXPECT_FALSE(read_latest_checkpoint(dir).has_value());
}

TEST(Checkpoint, HostileSidecarsAreSkippedAndEveryFallbackIsLogged) {
  const std::string dir = tmp_dir("ckpt_hostile");
  write_checkpoint(dir, 1, {{"x", torch::ones({4})}});
  auto two = write_checkpoint(dir, 2, {{"x", torch::zeros({4})}});
  auto three = write_checkpoint(dir, 3, {{"x", torch::zeros({4})}});
  // A JSON type error (weights_bytes as a string) and a deeply nested value: both must be
  // mdd::Error on the "skip this checkpoint" path, not foreign exceptions or a stack overflow.
  std::ofstream(three.meta_path) << R"({"step": 3, "weights_bytes": "many"})";
  std::ofstream(two.meta_path) << R"({"step": 2, "weights_bytes": )" << std::string(200000, '[')
                               << std::string(200000, ']') << "}";
  EXPECT_THROW(read_checkpoint(three), Error);
  EXPECT_THROW(read_checkpoint(two), Error);
  std::vector<std::string> lines;
  auto ck = open_checkpoint_for_resume(dir, [&](const std::string& l) { lines.push_back(l); });
  ASSERT_TRUE(ck.has_value());
  EXPECT_EQ(ck->info.step, 1);
  std::string all;
  for (const auto& l : lines) all += l + "\n";
  EXPECT_NE(all.find("0000003.json"), std::string::npos) << all;
  EXPECT_NE(all.find("0000002.json"), std::string::npos) << all;
  EXPECT_NE(all.find("fell back to step 1"), std::string::npos) << all;
  EXPECT_LT(all.size(), 4000u) << "error text must stay bounded";
  // Nothing readable: the restart from step 0 is said, not silent.
  fs::resize_file(dir + "/0000001.safetensors", 3);
  lines.clear();
  EXPECT_FALSE(open_checkpoint_for_resume(dir, [&](const std::string& l) { lines.push_back(l); }).has_value());
  ASSERT_FALSE(lines.empty());
  EXPECT_NE(lines.back().find("starting from step 0"), std::string::npos) << lines.back();
}

TEST(Checkpoint, OrphanTempFilesOfKilledRunsAreRemovedOnResume) {
  const std::string dir = tmp_dir("ckpt_orphans");
  write_checkpoint(dir, 5, {{"x", torch::ones({2})}});
  // A pid that cannot be running (above pid_max) stands for a killed writer; our own pid's
  // temporaries and unrelated names are left alone.
  const std::string dead = dir + "/0000010.safetensors.tmp.99999999.0";
  const std::string mine = dir + "/0000011.safetensors.tmp." + std::to_string(::getpid()) + ".0";
  const std::string other = dir + "/notes.tmp.txt";
  for (const auto& f : {dead, mine, other}) std::ofstream(f) << "partial";
  std::vector<std::string> lines;
  auto ck = open_checkpoint_for_resume(dir, [&](const std::string& l) { lines.push_back(l); });
  ASSERT_TRUE(ck.has_value());
  EXPECT_EQ(ck->info.step, 5);
  EXPECT_FALSE(fs::exists(dead));
  EXPECT_TRUE(fs::exists(mine));
  EXPECT_TRUE(fs::exists(other));
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_NE(lines[0].find("99999999"), std::string::npos);
}

TEST(TrainingData, SubsetOrderAndLabels) {
  torch::Tensor labels = torch::tensor({0, 1, 0, 1, 0, 2}, torch::kInt64);
  EXPECT_TRUE(torch::equal(finetune_subset(labels, 1), torch::tensor({0, 1, 5}, torch::kInt64)));
  EXPECT_TRUE(torch::equal(finetune_subset(labels, -1), torch::arange(6, torch::kInt64)));
  EXPECT_THROW(finetune_subset(labels, 2), Error);
  EXPECT_TRUE(torch::equal(epoch_order(10, 1, 3), epoch_order(10, 1, 3)));
  EXPECT_FALSE(torch::equal(epoch_order(10, 1, 3), epoch_order(10, 1, 4)));
}

TEST(Finetuner, StepLossIsDiffusionPlusMinimax) {
  const std::string dir = tmp_dir("ft_loss");
  auto data = tiny_data(dir);
  Finetuner ft(tiny_dit(), data, tiny_options());
  ft.step();
  ft.step();
  StepInputs in = ft.inputs(2);
  StepLoss l = ft.loss(in);
  // Separately: the diffusion's training loss with the same draws, and the minimax loss on the
  // memories as they are before step 3's push.
  DiT m = ft.model();
  const torch::Tensor y = in.model_labels;
  ModelFn fn = [m, y](const torch::Tensor& x, const torch::Tensor& t) mutable { return m->forward(x, t, y); };
  GaussianDiffusion diffusion;
  TrainingLosses tl = diffusion.training_losses(fn, in.batch.latents, in.t, in.noise);
  MinimaxTerms terms = minimax_loss(tl.pred_xstart, in.batch.labels, ft.real_memory(), ft.generated_memory(),
                                    MinimaxLossOptions().lambda_r(0.3).lambda_d(0.7));
  EXPECT_GT(terms.total.item<double>(), 0.0);  // both memories hold items of every class by now
  EXPECT_TRUE(mdd_test::AllClose(l.diffusion, tl.loss.mean(), 1e-6));
  EXPECT_TRUE(mdd_test::AllClose(l.minimax, terms.total, 1e-6));
  EXPECT_TRUE(mdd_test::AllClose(l.loss, tl.loss.mean() + 0.3 * terms.representativeness + 0.7 * terms.diversity, 1e-6));
  // About 10% of labels are dropped to the null class (3), never more than drawn.
  EXPECT_TRUE((in.model_labels == in.batch.model_labels).logical_or(in.model_labels == 3).all().item<bool>());
}

TEST(Finetuner, MemoriesHoldTheBatchOfEachClassAfterTheStep) {
  const std::string dir = tmp_dir("ft_banks");
  auto data = tiny_data(dir);
  Finetuner ft(tiny_dit(), data, tiny_options());
  StepInputs in0 = ft.inputs(0);
  ft.step();
  for (int64_t c = 0; c < 3; ++c) {
    const torch::Tensor mask = in0.batch.labels == c;
    const int64_t n = mask.sum().item<int64_t>();
    ASSERT_EQ(ft.real_memory().size(c), std::min<int64_t>(n, 4)) << "class " << c;
    ASSERT_EQ(ft.generated_memory().size(c), std::min<int64_t>(n, 4));
    if (n > 0 && n <= 4) {
      EXPECT_TRUE(torch::equal(ft.real_memory().get(c), in0.batch.latents.index({mask})));
    }
  }
  // After many steps each FIFO is capped at memory_size.
  for (int i = 0; i < 4; ++i) ft.step();
  for (int64_t c = 0; c < 3; ++c) EXPECT_EQ(ft.real_memory().size(c), 4);
}

TEST(Finetuner, DiffFitTrainsOnlyBiasesGammasAndClassTable) {
  const std::string dir = tmp_dir("ft_difffit");
  auto data = tiny_data(dir);
  DiT init = tiny_dit();
  const io::TensorMap before = state_dict(*init);
  std::map<std::string, torch::Tensor> snapshot;
  for (auto& kv : before) snapshot[kv.first] = kv.second.clone();
  Finetuner ft(init, data, tiny_options().steps(2));
  ft.train();
  for (auto& kv : state_dict(*ft.model())) {
    auto it = snapshot.find(kv.first);
    if (it == snapshot.end()) continue;  // gammas are new
    const bool changed = !torch::equal(kv.second, it->second);
    EXPECT_EQ(changed, is_difffit_trainable(kv.first)) << kv.first;
  }
  // EMA moved towards the model by (1 - 0.9999) per step: still very close to the initial weights.
  const torch::Tensor e = ft.ema()->y_embedder->embedding_table->weight;
  EXPECT_FALSE(torch::equal(e, snapshot.at("y_embedder.embedding_table.weight")));
  EXPECT_TRUE(mdd_test::AllClose(e, snapshot.at("y_embedder.embedding_table.weight"), 1e-3));
}

TEST(Finetuner, ResumeContinuesBitForBit) {
  const std::string dir = tmp_dir("ft_resume");
  auto data = tiny_data(dir);
  // Uninterrupted: 6 steps.
  Finetuner full(tiny_dit(), data, tiny_options());
  full.train();
  // Interrupted after 3 steps (checkpoint), then a new process resumes and finishes.
  {
    Finetuner first(tiny_dit(), data, tiny_options().steps(3).checkpoint_dir(dir + "/ck"));
    first.train();
  }
  Finetuner second(tiny_dit(), data, tiny_options().checkpoint_dir(dir + "/ck"));
  ASSERT_TRUE(second.resume());
  EXPECT_EQ(second.step_count(), 3);
  second.train();
  EXPECT_EQ(second.step_count(), 6);
  std::string why;
  EXPECT_TRUE(equal_maps(state_dict(*full.model()), state_dict(*second.model()), &why)) << why;
  EXPECT_TRUE(equal_maps(state_dict(*full.ema()), state_dict(*second.ema()), &why)) << why;
  EXPECT_TRUE(equal_maps(full.optimizer().state(), second.optimizer().state(), &why)) << why;
  for (int64_t c = 0; c < 3; ++c) {
    EXPECT_TRUE(torch::equal(full.generated_memory().get(c), second.generated_memory().get(c)));
    EXPECT_TRUE(torch::equal(full.real_memory().get(c), second.real_memory().get(c)));
  }
  // A resumed run with a different loop configuration is refused, naming the option.
  Finetuner other(tiny_dit(), data, tiny_options().lambda_r(0.5).checkpoint_dir(dir + "/ck"));
  try {
    other.resume();
    FAIL() << "expected mdd::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("lambda_r"), std::string::npos) << e.what();
  }
}

namespace {
// Training data whose latents turn NaN from a given draw on.
class PoisonedData : public TrainingData {
 public:
  PoisonedData(std::shared_ptr<LatentTrainingData> inner, int64_t poison_after) : inner_(inner), after_(poison_after) {}
  int64_t size() const override { return inner_->size(); }
  int64_t num_classes() const override { return inner_->num_classes(); }
  std::vector<int64_t> latent_shape() const override { return inner_->latent_shape(); }
  torch::Tensor labels() const override { return inner_->labels(); }
  LatentBatch batch(const torch::Tensor& idx, torch::Generator& g) const override {
    LatentBatch b = inner_->batch(idx, g);
    if (idx.numel() > 0 && ++calls_ > after_) b.latents.fill_(std::nan(""));
    return b;
  }

 private:
  std::shared_ptr<LatentTrainingData> inner_;
  int64_t after_;
  mutable int64_t calls_ = 0;
};
}  // namespace

TEST(Finetuner, NanLossStopsWithStepAndLastCheckpoint) {
  const std::string dir = tmp_dir("ft_nan");
  auto data = std::make_shared<PoisonedData>(tiny_data(dir), 2);
  Finetuner ft(tiny_dit(), data, tiny_options().ckpt_every(1).checkpoint_dir(dir + "/ck"));
  try {
    ft.train();
    FAIL() << "expected mdd::Error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("step 3"), std::string::npos) << msg;
    EXPECT_NE(msg.find("0000002.safetensors"), std::string::npos) << msg;
  }
  auto latest = read_latest_checkpoint(dir + "/ck");
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(latest->info.step, 2);
}

TEST(Finetuner, RejectsBadSetups) {
  const std::string dir = tmp_dir("ft_bad");
  auto data = tiny_data(dir);
  EXPECT_THROW(Finetuner(tiny_dit(), data, tiny_options().batch_size(100)), Error);
  EXPECT_THROW(Finetuner(DiT(DiTOptions(16, 2, 1, 32, 1, 2).num_classes(3)), data, tiny_options()), Error);
  EXPECT_THROW(Pretrainer(tiny_dit(), data, tiny_options()), Error);
  auto respaced = tiny_options();
  respaced.diffusion().timestep_respacing("50");  // training draws from every step
  EXPECT_THROW(Finetuner(tiny_dit(), data, respaced), Error);
  {
    // The EMA starts as a deep copy (DiT::clone) of the model, DiffFit gammas included.
    Finetuner ft(tiny_dit(), data, tiny_options());
    const auto m = state_dict(*ft.model()), e = state_dict(*ft.ema());
    ASSERT_EQ(m.size(), e.size());
    for (const auto& [k, v] : m) {
      ASSERT_TRUE(e.count(k)) << k;
      EXPECT_TRUE(torch::equal(v, e.at(k))) << k;
      EXPECT_NE(v.data_ptr(), e.at(k).data_ptr()) << k;
      EXPECT_FALSE(e.at(k).requires_grad()) << k;
    }
    EXPECT_TRUE(has_difffit(ft.ema()));
  }
  Pretrainer pre(tiny_dit(), data, pretrain_defaults().batch_size(6).steps(1));
  pre.train();
  EXPECT_FALSE(has_difffit(pre.model()));
  EXPECT_FALSE(pre.model()->pos_embed.requires_grad());
  EXPECT_TRUE(pre.model()->blocks->parameters().front().requires_grad());
}

// ------------------------------------------------------------------ mixed precision and warm-ups

TEST(Precision, NamesResolveAndGuard) {
  for (Precision p : {Precision::kFP32, Precision::kBF16, Precision::kFP16, Precision::kAuto})
    EXPECT_EQ(parse_precision(precision_name(p)), p);
  EXPECT_THROW(parse_precision("bfloat16"), Error);
  EXPECT_THROW(resolve_precision(Precision::kFP16, torch::kCPU), Error);
  EXPECT_EQ(resolve_precision(Precision::kAuto, torch::kCPU), cpu_has_fast_bf16() ? Precision::kBF16 : Precision::kFP32);
  EXPECT_EQ(resolve_precision(Precision::kBF16, torch::kCPU), Precision::kBF16);
  EXPECT_THROW(AutocastGuard(torch::kCPU, Precision::kAuto), Error);
  auto a = torch::randn({4, 4});
  {
    AutocastGuard outer(torch::kCPU, Precision::kBF16);
    EXPECT_EQ(torch::mm(a, a).scalar_type(), torch::kBFloat16);
    {
      AutocastGuard inner(torch::kCPU, Precision::kFP32);  // fp32 guard is a no-op inside
      EXPECT_EQ(torch::mm(a, a).scalar_type(), torch::kBFloat16);
    }
    EXPECT_EQ(torch::mm(a, a).scalar_type(), torch::kBFloat16);
  }
  EXPECT_EQ(torch::mm(a, a).scalar_type(), torch::kFloat32);
  EXPECT_NE(describe_precision(Precision::kBF16, torch::kCPU).find("bf16 autocast (cpu"), std::string::npos);
}

// The bf16 training step keeps the fp32 result: same draws, per-step losses within a small
// fraction of the step-to-step spread of the loss; master weights, EMA and AdamW state stay fp32.
TEST(Finetuner, Bf16StepsTrackFp32Steps) {
  const std::string dir = tmp_dir("ft_bf16");
  auto data = tiny_data(dir);
  auto run = [&](Precision p) {
    Finetuner ft(tiny_dit(), data, tiny_options().steps(30).precision(p));
    std::vector<double> losses;
    for (int i = 0; i < 30; ++i) losses.push_back(ft.step().loss);
    for (auto& kv : ft.model()->named_parameters()) EXPECT_EQ(kv.value().scalar_type(), torch::kFloat32) << kv.key();
    for (auto& kv : ft.ema()->named_parameters()) EXPECT_EQ(kv.value().scalar_type(), torch::kFloat32) << kv.key();
    for (auto& kv : ft.optimizer().state()) EXPECT_TRUE(kv.second.scalar_type() == torch::kFloat32 || kv.second.scalar_type() == torch::kInt64) << kv.first;
    return std::make_pair(losses, ft.precision());
  };
  auto [l32, p32] = run(Precision::kFP32);
  auto [l16, p16] = run(Precision::kBF16);
  EXPECT_EQ(p32, Precision::kFP32);
  EXPECT_EQ(p16, Precision::kBF16);
  const auto a = torch::tensor(l32, torch::kFloat64), b = torch::tensor(l16, torch::kFloat64);
  const double spread = a.std().item<double>();
  const double diff = (a - b).abs().mean().item<double>();
  EXPECT_GT(diff, 0.0) << "bf16 run identical to fp32: autocast did not engage";
  EXPECT_LT(diff, 0.1 * spread) << "mean |bf16 - fp32| loss " << diff << " vs step-to-step spread " << spread;
}

TEST(Finetuner, EmaAndLearningRateWarmUp) {
  const std::string dir = tmp_dir("ft_warmup");
  auto data = tiny_data(dir);
  Finetuner ft(tiny_dit(), data, tiny_options().ema_decay(0.999).ema_warmup(true).lr(1e-3).lr_warmup(4));
  io::TensorMap before;
  for (const auto& kv : state_dict(*ft.ema())) before.emplace(kv.first, kv.second.clone());  // state_dict aliases
  TrainStats s0 = ft.step();
  EXPECT_DOUBLE_EQ(s0.lr, 1e-3 * 1 / 4);
  // Step 0 uses decay min(0.999, 1/10) = 0.1.
  const io::TensorMap model = state_dict(*ft.model());
  for (const auto& kv : state_dict(*ft.ema())) {
    auto expect = before.at(kv.first).clone().mul_(0.1).add_(model.at(kv.first), 0.9);
    EXPECT_TRUE(mdd_test::AllClose(kv.second, expect, 1e-7)) << kv.first;
  }
  EXPECT_DOUBLE_EQ(ft.step().lr, 1e-3 * 2 / 4);
  ft.step();
  ft.step();
  EXPECT_DOUBLE_EQ(ft.step().lr, 1e-3);
  EXPECT_THROW(Finetuner(tiny_dit(), data, tiny_options().lr_warmup(-1)), Error);
  EXPECT_THROW(Finetuner(tiny_dit(), data, tiny_options().precision(Precision::kFP16)), Error);  // CPU
}

// ------------------------------------------------------------------ VAE training

TEST(VaeTrainer, LearnsResumesBitForBitAndSavesADiffusersFolder) {
  const std::string dir = tmp_dir("vae_train");
  torch::manual_seed(0);
  auto opts = VaeTrainerOptions().steps(40).batch_size(8).lr(3e-3).lr_warmup(5).ckpt_every(0).log_every(0);
  VaeTrainer a(tiny_vae(), tiny_vae_images(), opts);
  const double psnr0 = reconstruction_psnr(a.vae(), tiny_vae_images().images);
  std::vector<double> losses;
  for (int i = 0; i < 40; ++i) losses.push_back(a.step().loss);
  const double first = (losses[0] + losses[1] + losses[2]) / 3, last = (losses[37] + losses[38] + losses[39]) / 3;
  EXPECT_LT(last, 0.7 * first) << "loss " << first << " -> " << last;
  torch::Tensor rec;
  const double psnr1 = reconstruction_psnr(a.vae(), tiny_vae_images().images, &rec);
  EXPECT_GT(psnr1, psnr0 + 3.0);
  EXPECT_EQ(rec.sizes(), tiny_vae_images().images.sizes());

  // Resume: 6 steps with a checkpoint at 3, killed, continued -> the uninterrupted weights.
  auto ropts = VaeTrainerOptions(opts).steps(6).ckpt_every(3).checkpoint_dir(dir + "/ck");
  torch::manual_seed(1);
  auto init = state_dict(*tiny_vae());
  auto make = [&] {
    auto v = tiny_vae();
    load_state_dict(*v, init, true);
    return v;
  };
  VaeTrainer full(make(), tiny_vae_images(), VaeTrainerOptions(ropts).checkpoint_dir(""));
  full.train();
  {
    VaeTrainer part(make(), tiny_vae_images(), VaeTrainerOptions(ropts).steps(3));
    part.train();
  }
  VaeTrainer resumed(make(), tiny_vae_images(), ropts);
  ASSERT_TRUE(resumed.resume());
  EXPECT_EQ(resumed.step_count(), 3);
  resumed.train();
  std::string why;
  EXPECT_TRUE(equal_maps(state_dict(*full.vae()), state_dict(*resumed.vae()), &why)) << why;
  EXPECT_THROW(VaeTrainer(make(), tiny_vae_images(), VaeTrainerOptions(ropts).kl_weight(0.5)).resume(), Error);

  // A diffusers folder that from_pretrained reads back, with a fitted scaling factor.
  auto vae = a.vae();
  vae->options.scaling_factor(fit_scaling_factor(vae, tiny_vae_images().images));
  EXPECT_GT(vae->options.scaling_factor(), 0.0);
  save_pretrained(vae, dir + "/vae");
  auto back = AutoencoderKL::from_pretrained(dir + "/vae");
  EXPECT_DOUBLE_EQ(back->options.scaling_factor(), vae->options.scaling_factor());
  EXPECT_EQ(back->downsample_factor(), 2);
  EXPECT_DOUBLE_EQ(reconstruction_psnr(back, tiny_vae_images().images), psnr1);

  // Bad setups.
  LabeledImages odd = tiny_vae_images();
  odd.images = odd.images.narrow(1, 0, 7).contiguous();
  EXPECT_THROW(VaeTrainer(tiny_vae(), odd, opts), Error);
  EXPECT_THROW(VaeTrainer(tiny_vae(), tiny_vae_images(), VaeTrainerOptions(opts).reconstruction("l2")), Error);
  EXPECT_THROW(VaeTrainer(tiny_vae(), tiny_vae_images(), VaeTrainerOptions(opts).batch_size(100)), Error);
}

TEST(VaeTrainer, DecoderOnlyKeepsTheLatentSpaceAndSharpens) {
  torch::manual_seed(0);
  auto base = VaeTrainerOptions().steps(15).batch_size(8).lr(3e-3).lr_warmup(5).ckpt_every(0).log_every(0);
  VaeTrainer joint(tiny_vae(), tiny_vae_images(), base);
  joint.train();
  const auto start = state_dict(*joint.vae());
  auto copy = [&] {
    auto v = tiny_vae();
    load_state_dict(*v, start, true);
    return v;
  };
  const double psnr0 = reconstruction_psnr(copy(), tiny_vae_images().images);
  VaeTrainer dec(copy(), tiny_vae_images(), VaeTrainerOptions(base).steps(40).train_encoder(false));
  dec.train();
  const auto after = state_dict(*dec.vae());
  int64_t frozen = 0, moved = 0;
  for (const auto& kv : after) {
    const bool enc = kv.first.rfind("encoder.", 0) == 0 || kv.first.rfind("quant_conv.", 0) == 0;
    const bool same = torch::equal(kv.second, start.at(kv.first));
    if (enc) {
      EXPECT_TRUE(same) << kv.first << " moved although the encoder is frozen";
      ++frozen;
    } else if (!same) {
      ++moved;
    }
  }
  EXPECT_GT(frozen, 0);
  EXPECT_GT(moved, 0);
  // Same encoder -> bit-identical latents; a better decoder -> higher PSNR.
  {
    torch::NoGradGuard ng;
    const auto x = images_to_unit_range(tiny_vae_images().images);
    auto ref = copy();
    ref->runtime = dec.vae()->runtime;
    ref->eval();
    const auto a = ref->encode(x).mean, b = dec.vae()->encode(x).mean;
    EXPECT_TRUE(torch::equal(a, b)) << (a - b).abs().max().item<double>();
  }
  EXPECT_GT(reconstruction_psnr(dec.vae(), tiny_vae_images().images), psnr0 + 0.5);
  // The mode is part of the loop signature: a joint checkpoint does not resume a decoder-only run.
  const std::string dir = tmp_dir("vae_dec");
  VaeTrainer(copy(), tiny_vae_images(), VaeTrainerOptions(base).steps(2).checkpoint_dir(dir)).train();
  EXPECT_THROW(VaeTrainer(copy(), tiny_vae_images(), VaeTrainerOptions(base).steps(4).checkpoint_dir(dir).train_encoder(false)).resume(),
               Error);
}

// ------------------------------------------------------------------ crash test
// The child half: runs only when re-executed by KilledFinetunesResumeToTheSameWeights (the
// environment names its run folder). A fine-tune with a checkpoint after every step that resumes
// whatever the previous (killed) process left, then writes its final weights.
TEST(CrashChild, FinetuneWithCheckpointEveryStep) {
  const char* dir = std::getenv("MDD_CRASH_CHILD_DIR");
  if (!dir) GTEST_SKIP() << "helper of Finetuner.KilledFinetunesResumeToTheSameWeights";
  torch::set_num_threads(1);
  fs::create_directories(std::string(dir) + "/data");
  auto data = tiny_data(std::string(dir) + "/data");
  Finetuner ft(tiny_dit(), data, tiny_options().steps(300).ckpt_every(1).keep_checkpoints(2)
                                                .checkpoint_dir(std::string(dir) + "/checkpoints"));
  ft.resume();
  ft.train();
  io::save_safetensors(std::string(dir) + "/final.safetensors", state_dict(*ft.ema()));
}

TEST(Finetuner, KilledFinetunesResumeToTheSameWeights) {
  // SIGKILL at random moments (checkpoint writes included: one is written every step); each re-run
  // resumes from the last complete checkpoint, and the final weights equal an uninterrupted run's.
  // Runs the child in `dir`. With kill_after_s >= 0 it is SIGKILLed that long after it has written
  // its first new checkpoint (so the kill lands inside training, where a checkpoint is written every
  // step, not during process start-up). Returns true when the child finished on its own.
  auto latest = [](const std::string& dir) {
    const auto all = list_checkpoints(dir + "/checkpoints");
    return all.empty() ? int64_t(-1) : all.back().step;
  };
  auto run_child = [&](const std::string& dir, double kill_after_s) {
    const std::string env = "MDD_CRASH_CHILD_DIR=" + dir;
    const std::string filter = "--gtest_filter=CrashChild.FinetuneWithCheckpointEveryStep";
    std::vector<char*> argv = {const_cast<char*>("/proc/self/exe"), const_cast<char*>(filter.c_str()), nullptr};
    std::vector<char*> envp = {const_cast<char*>(env.c_str()), const_cast<char*>("OMP_NUM_THREADS=1"), nullptr};
    posix_spawn_file_actions_t quiet;
    posix_spawn_file_actions_init(&quiet);
    posix_spawn_file_actions_addopen(&quiet, 1, "/dev/null", O_WRONLY, 0);
    const int64_t before = latest(dir);
    pid_t pid = 0;
    EXPECT_EQ(::posix_spawn(&pid, "/proc/self/exe", &quiet, nullptr, argv.data(), envp.data()), 0);
    posix_spawn_file_actions_destroy(&quiet);
    int status = 0;
    bool timing = false;
    auto t0 = std::chrono::steady_clock::now();
    while (::waitpid(pid, &status, WNOHANG) == 0) {
      if (kill_after_s >= 0 && !timing && latest(dir) > before) {
        timing = true;
        t0 = std::chrono::steady_clock::now();
      }
      if (timing && std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > kill_after_s) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, &status, 0);
        return false;  // killed
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child failed, status " << status;
    return true;  // finished
  };
  const std::string clean = tmp_dir("crash_clean"), killed = tmp_dir("crash_killed");
  ASSERT_TRUE(run_child(clean, -1));
  std::mt19937 rng(12345);
  int kills = 0;
  bool finished = false;
  for (int attempt = 0; attempt < 6 && !finished; ++attempt) {
    finished = run_child(killed, std::uniform_real_distribution<double>(0.0, 0.3)(rng));
    kills += !finished;
  }
  if (!finished) run_child(killed, -1);
  ASSERT_TRUE(fs::exists(killed + "/final.safetensors")) << "the killed run never finished";
  EXPECT_GE(kills, 3) << "too few kills landed before the run finished (machine too fast for the delays?)";
  std::string why;
  EXPECT_TRUE(equal_maps(io::load_safetensors(clean + "/final.safetensors").tensors,
                         io::load_safetensors(killed + "/final.safetensors").tensors, &why))
      << why << " after " << kills << " kills";
  // No temporary files are left behind by the last (complete) run.
  for (const auto& e : fs::directory_iterator(killed + "/checkpoints"))
    EXPECT_EQ(e.path().filename().string().find(".tmp."), std::string::npos) << e.path();
}
