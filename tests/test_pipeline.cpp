// Pipeline config parsing and a tiny end-to-end distillation on a synthetic image folder.
#include <sys/stat.h>

#include <filesystem>
#include <fstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "mdd/data/class_lists.h"
#include "mdd/diffusion/sampler.h"
#include "mdd/dist/process_group.h"
#include "mdd/eval/evaluator.h"
#include "mdd/eval/selection.h"
#include "mdd/io/image.h"
#include "mdd/io/safetensors.h"
#include "mdd/io/state_dict.h"
#include "mdd/models/dit.h"
#include "mdd/train/finetune.h"
#include "mdd/pipeline/config.h"
#include "mdd/pipeline/distill.h"
#include "mdd/train/checkpoint.h"
#include "mdd/train/vae_trainer.h"
#include "mdd/util/error.h"
#include "dist_spawn.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace mdd;

namespace {
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST(Config, DefaultsAreTheReferenceRun) {
  DistillConfig c = parse_config(R"({"codec": {"encoder": "vae"}})");
  EXPECT_EQ(c.finetune.steps, 12000);
  EXPECT_EQ(c.finetune.batch_size, 8);
  EXPECT_DOUBLE_EQ(c.finetune.lr, 1e-3);
  EXPECT_DOUBLE_EQ(c.finetune.ema_decay, 0.9999);
  EXPECT_DOUBLE_EQ(c.finetune.lambda_r, 0.002);
  EXPECT_DOUBLE_EQ(c.finetune.lambda_d, 0.008);
  EXPECT_EQ(c.finetune.memory_size, 64);
  EXPECT_EQ(c.sample.steps, "50");
  EXPECT_DOUBLE_EQ(c.sample.cfg_scale, 4.0);
  EXPECT_EQ(c.model.name, "DiT-XL/2");
}

TEST(Config, TyposAndBadValuesNameTheKey) {
  std::string msg = error_of([] { parse_config(R"({"finetune": {"lamda_r": 0.1}})", "my.json"); });
  EXPECT_NE(msg.find("my.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find("finetune.lamda_r"), std::string::npos) << msg;
  EXPECT_NE(msg.find("lambda_r"), std::string::npos) << msg;  // lists the known keys
  msg = error_of([] { parse_config(R"({"finetun": {}})"); });
  EXPECT_NE(msg.find("finetun"), std::string::npos) << msg;
  msg = error_of([] { parse_config(R"({"outputdir": "x"})"); });
  EXPECT_NE(msg.find("outputdir"), std::string::npos) << msg;
  msg = error_of([] { parse_config(R"({"codec": {"kind": "identity"}, "finetune": {"steps": "many"}})"); });
  EXPECT_NE(msg.find("finetune.steps"), std::string::npos) << msg;
  msg = error_of([] { parse_config(R"({"codec": {"kind": "identity"}, "sample": {"method": "euler"}})"); });
  EXPECT_NE(msg.find("sample.method"), std::string::npos) << msg;
  EXPECT_NE(msg.find("ddpm, ddim"), std::string::npos) << msg;  // the enum's own list of names
  msg = error_of([] { parse_config(R"({"codec": {"kind": "identity"}, "vae": {"precision": "fp8"}})"); });
  EXPECT_NE(msg.find("vae.precision"), std::string::npos) << msg;
  EXPECT_NE(msg.find("fp32, bf16, fp16, auto"), std::string::npos) << msg;
  msg = error_of([] { parse_config(R"({"codec": {"kind": "identity"}, "evaluate": {"methods": ["random", "gan"]}})"); });
  EXPECT_NE(msg.find("evaluate.methods"), std::string::npos) << msg;
  EXPECT_FALSE(error_of([] { parse_config("{not json"); }).empty());
  EXPECT_FALSE(error_of([] { load_config("/nonexistent/config.json"); }).empty());
}

// Every string choice of the config is an enum with one name table: name -> parse round-trips, and a
// bad name is an error listing the table (checked through the config key that holds it).
TEST(Config, StringChoicesAreEnumsWithNameParsePairs) {
  for (DataKind k : {DataKind::kFashionMnist, DataKind::kImageFolder}) EXPECT_EQ(parse_data_kind(data_kind_name(k)), k);
  for (CodecKind k : {CodecKind::kIdentity, CodecKind::kVae}) EXPECT_EQ(parse_codec_kind(codec_kind_name(k)), k);
  for (DistillMethod m : {DistillMethod::kRandom, DistillMethod::kDit, DistillMethod::kDifffit, DistillMethod::kMinimax})
    EXPECT_EQ(parse_distill_method(distill_method_name(m)), m);
  for (EvalProtocol p : {EvalProtocol::kIdc, EvalProtocol::kDc}) EXPECT_EQ(parse_eval_protocol(eval_protocol_name(p)), p);
  for (ReconstructionLoss r : {ReconstructionLoss::kL1, ReconstructionLoss::kMse})
    EXPECT_EQ(parse_reconstruction_loss(reconstruction_loss_name(r)), r);
  EXPECT_STREQ(data_kind_name(DataKind::kImageFolder), "imagefolder");
  EXPECT_STREQ(eval_protocol_name(EvalProtocol::kDc), "dc");
  const std::pair<const char*, const char*> cases[] = {
      {R"({"data": {"kind": "cifar"}})", "fashion-mnist, imagefolder"},
      {R"({"codec": {"kind": "vqgan"}})", "identity, vae"},
      {R"({"codec": {"kind": "identity"}, "evaluate": {"protocol": "dm"}})", "idc, dc"},
      {R"({"codec": {"kind": "identity"}, "evaluate": {"methods": ["herding"]}})", "random, dit, difffit, minimax"},
      {R"({"codec": {"kind": "identity"}, "vae": {"reconstruction": "lpips"}})", "l1, mse"}};
  for (const auto& [json_text, names] : cases) {
    const std::string msg = error_of([&] { parse_config(json_text); });
    EXPECT_NE(msg.find(names), std::string::npos) << json_text << " -> " << msg;
  }
  // The library options take the same names and give the same list.
  EXPECT_NE(error_of([] { Evaluator(EvalOptions().protocol("dm")); }).find("idc, dc"), std::string::npos);
  EXPECT_THROW(parse_reconstruction_loss("L1"), Error);  // names are exact
}

// A numeric rule is written once, in the component's `check_options`: the config names the key, the
// component's constructor throws for the same value, and a collecting `OptionFail` sees every rule.
TEST(Config, EachSectionIsJudgedByItsComponentsRules) {
  const std::string base = R"({"codec": {"kind": "identity"}, )";
  const std::pair<const char*, const char*> cases[] = {
      {R"("model": {"class_dropout_prob": 1.0}})", "'model.class_dropout_prob' must lie in [0, 1)"},
      {R"("model": {"name": "custom", "hidden_size": 96, "num_heads": 5}})", "'model.num_heads'"},
      {R"("finetune": {"memory_size": 0}})", "'finetune.memory_size' must be > 0"},
      {R"("finetune": {"lambda_d": -1}})", "'finetune.lambda_d'"},
      {R"("pretrain": {"ema_decay": 1.5}})", "'pretrain.ema_decay' must lie in [0, 1]"},
      {R"("vae": {"kl_weight": -0.5}})", "'vae.kl_weight'"},
      {R"("vae": {"block_out_channels": [16, 30]}})", "'vae.block_out_channels'"},
      {R"("sample": {"cfg_scale": -2}})", "'sample.cfg_scale'"},
      {R"("sample": {"cfg_interval": [700, 200]}})", "'sample.cfg_interval'"},
      {R"("sample": {"eta": -0.5}})", "'sample.eta'"},
      {R"("evaluate": {"repeats": 0}})", "'evaluate.repeats' must be >= 1"}};
  for (const auto& [section, expected] : cases) {
    const std::string msg = error_of([&] { parse_config(base + section); });
    EXPECT_NE(msg.find(expected), std::string::npos) << section << " -> " << msg;
  }
  // The library components reject the same values with the same rule text.
  EXPECT_NE(error_of([] { DiT(DiTOptions(8, 2, 4, 32, 1, 2).class_dropout_prob(1.0)); }).find("must lie in [0, 1)"),
            std::string::npos);
  EXPECT_NE(error_of([] { check_options(FinetuneOptions().memory_size(0), throw_option_error("Finetuner")); })
                .find("Finetuner: memory_size must be > 0"),
            std::string::npos);
  EXPECT_NE(error_of([] { Evaluator(EvalOptions().repeats(0)); }).find("repeats must be >= 1"), std::string::npos);
  // A collecting OptionFail sees every broken rule, and the validators never divide by a zero size.
  std::vector<std::string> broken;
  const OptionFail collect = [&](const std::string& option, const std::string&) { broken.push_back(option); };
  check_options(DiTOptions(7, 0, 4, 30, 1, 0).class_dropout_prob(-0.1), collect);
  EXPECT_EQ(broken, (std::vector<std::string>{"patch_size", "num_heads", "hidden_size", "class_dropout_prob"}));
  broken.clear();
  check_options(SamplerOptions().batch_size(0).eta(-1).latent_shape({4, 8}), collect);
  EXPECT_EQ(broken, (std::vector<std::string>{"batch_size", "eta", "latent_shape"}));
  broken.clear();
  check_options(DiTOptions(32, 2, 4, 96, 2, 4), collect);
  check_options(FinetuneOptions(), collect);
  check_options(VaeTrainerOptions(), collect);
  check_options(AutoencoderKLOptions(), collect);
  check_options(EvalOptions(), collect);
  EXPECT_TRUE(broken.empty()) << "defaults break rules: " << broken.front();
}

TEST(Config, VaeTrainingSection) {
  // A VAE codec needs either a named VAE or a training budget.
  std::string msg = error_of([] { parse_config(R"({"codec": {"kind": "vae"}})"); });
  EXPECT_NE(msg.find("codec.encoder"), std::string::npos) << msg;
  EXPECT_NE(msg.find("vae.steps"), std::string::npos) << msg;
  DistillConfig c = parse_config(R"({"codec": {"kind": "vae"}, "model": {"in_channels": 4},
                                     "vae": {"steps": 10, "block_out_channels": [8, 16]}})");
  EXPECT_EQ(c.vae.block_out_channels, (std::vector<int64_t>{8, 16}));
  // Decoder-only steps follow a joint training; alone they are refused, naming the key.
  msg = error_of([] { parse_config(R"({"codec": {"kind": "vae", "encoder": "x"}, "vae": {"steps": 0, "decoder_steps": 5}})"); });
  EXPECT_NE(msg.find("vae.decoder_steps"), std::string::npos) << msg;
  EXPECT_EQ(parse_config(config_to_json(c)).vae.block_out_channels, c.vae.block_out_channels);
  msg = error_of([] { parse_config(R"({"codec": {"kind": "vae"}, "vae": {"steps": 10, "block_out_channels": [8, 12]}})"); });
  EXPECT_NE(msg.find("vae.block_out_channels"), std::string::npos) << msg;
  msg = error_of([] { parse_config(R"({"codec": {"kind": "vae"}, "vae": {"steps": 10, "block_out_channels": "16,32"}})"); });
  EXPECT_NE(msg.find("vae.block_out_channels"), std::string::npos) << msg;
  msg = error_of([] { parse_config(R"({"codec": {"kind": "vae"}, "vae": {"steps": 10, "latent_channels": 8}})"); });
  EXPECT_NE(msg.find("model.in_channels"), std::string::npos) << msg;
  msg = error_of([] { parse_config(R"({"codec": {"kind": "vae"}, "vae": {"steps": 10, "kl": 0.1}})"); });
  EXPECT_NE(msg.find("vae.kl"), std::string::npos) << msg;
  EXPECT_NE(msg.find("kl_weight"), std::string::npos) << msg;
}

TEST(Config, DeeplyNestedValuesGiveShortErrors) {
  // nlohmann's dump() recurses once per level; error messages print values without recursion.
  const std::string deep = std::string(300000, '[') + std::string(300000, ']');
  try {
    parse_config(R"({"finetune": {"steps": )" + deep + "}}");
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("finetune.steps"), std::string::npos) << e.what();
    EXPECT_LT(std::string(e.what()).size(), 400u);
  }
  DistillConfig c;
  EXPECT_THROW(apply_override(c, "sample.cfg_scale=" + deep), Error);
  // A FIFO named like a config is refused, not waited on.
  const std::string fifo = mdd_test::tmp_dir("config_fifo") + "/config.json";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  EXPECT_THROW(load_config(fifo), Error);
}

TEST(Config, RoundTripAndOverrides) {
  DistillConfig c = parse_config(R"({"codec": {"kind": "identity"}, "sample": {"ipc": 7}})");
  apply_override(c, "finetune.steps=123");
  apply_override(c, "name=hello");
  apply_override(c, "evaluate.methods=[\"random\"]");
  EXPECT_EQ(c.finetune.steps, 123);
  EXPECT_EQ(c.name, "hello");
  DistillConfig d = parse_config(config_to_json(c));
  EXPECT_EQ(config_to_json(d), config_to_json(c));
  EXPECT_EQ(d.sample.ipc, 7);
  EXPECT_THROW(apply_override(c, "finetune.stepz=1"), Error);
  EXPECT_THROW(apply_override(c, "finetune.steps=-1"), Error);
  EXPECT_EQ(c.finetune.steps, 123);  // a rejected override changes nothing
  // Mixed precision and warm-ups are keys of every training/sampling section.
  apply_override(c, "pretrain.precision=bf16");
  apply_override(c, "finetune.precision=auto");
  apply_override(c, "sample.precision=fp16");
  apply_override(c, "pretrain.ema_warmup=true");
  apply_override(c, "pretrain.lr_warmup=500");
  EXPECT_EQ(c.pretrain.precision, "bf16");
  EXPECT_EQ(c.finetune.precision, "auto");
  EXPECT_EQ(c.sample.precision, "fp16");
  EXPECT_TRUE(c.pretrain.ema_warmup);
  EXPECT_EQ(c.pretrain.lr_warmup, 500);
  EXPECT_THROW(apply_override(c, "pretrain.precision=bf17"), Error);
  EXPECT_THROW(apply_override(c, "pretrain.lr_warmup=-5"), Error);
  // The reference guidance rule is valid for one-channel models too (it guides eps and variance).
  EXPECT_NO_THROW(apply_override(c, "sample.guidance=reference"));
  // The guidance interval and DDIM's eta are sampling keys.
  apply_override(c, "sample.cfg_interval=[0,600]");
  apply_override(c, "sample.eta=0.5");
  EXPECT_EQ(c.sample.cfg_interval, (std::vector<int64_t>{0, 600}));
  EXPECT_DOUBLE_EQ(c.sample.eta, 0.5);
  EXPECT_THROW(apply_override(c, "sample.cfg_interval=[600]"), Error);
}

TEST(Config, ShippedConfigsParse) {
  const fs::path dir = fs::path(MDD_TEST_DATA_DIR).parent_path().parent_path() / "configs";
  int n = 0;
  for (const auto& e : fs::directory_iterator(dir)) {
    if (e.path().extension() != ".json") continue;
    EXPECT_NO_THROW(load_config(e.path().string())) << e.path();
    ++n;
  }
  EXPECT_GE(n, 5);
}

TEST(Config, ShippedFashionMnistModelsFitTheirConfigs) {
  // The demo's committed weights must load strictly into the shipped configs (paths are relative
  // to the repository root, where scripts/demo.sh runs).
  const fs::path root = fs::path(MDD_TEST_DATA_DIR).parent_path().parent_path();
  for (const char* name : {"fashion-mnist.json", "fashion-mnist-pixel.json"}) {
    SCOPED_TRACE(name);
    const DistillConfig c = load_config((root / "configs" / name).string());
    ASSERT_FALSE(c.model.checkpoint.empty());
    EXPECT_NO_THROW(load_model(c.model, (root / c.model.checkpoint).string()));
    if (c.codec.kind != "vae") continue;
    AutoencoderKL vae = AutoencoderKL::from_pretrained((root / c.codec.encoder).string());
    EXPECT_EQ(vae->options.latent_channels(), c.model.in_channels);
    EXPECT_EQ(vae->options.latent_channels(), c.vae.latent_channels);
    EXPECT_EQ(vae->options.block_out_channels(), c.vae.block_out_channels);
    const int64_t factor = int64_t(1) << (vae->options.block_out_channels().size() - 1);
    EXPECT_EQ(28 / factor, c.model.input_size);
  }
}

TEST(Pipeline, ShippedClassListFilesMatchTheCompiledLists) {
  const fs::path dir = fs::path(MDD_TEST_DATA_DIR).parent_path().parent_path() / "data" / "class_lists";
  for (const char* name : {"woof", "nette", "idc", "class100", "imagenet"})
    EXPECT_EQ(read_class_list((dir / (std::string(name) + ".txt")).string()), class_list(name)) << name;
}

TEST(Pipeline, SanitizeClassDir) {
  EXPECT_EQ(sanitize_class_dir("T-shirt/top"), "T-shirt_top");
  EXPECT_EQ(sanitize_class_dir("n02096294"), "n02096294");
  EXPECT_EQ(sanitize_class_dir(".."), "class");
}

namespace {

// Grey 8x8 PNGs `<dir>/cls<c>/<k>.png`: noise in [0, 60) with rows [c * stride, c * stride + rows)
// brightened by 180, so that class c is learnable.
void write_band_images(const std::string& dir, int nclass, int per_class, int stride, int rows, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  for (int c = 0; c < nclass; ++c) {
    fs::create_directories(dir + "/cls" + std::to_string(c));
    for (int k = 0; k < per_class; ++k) {
      torch::Tensor img = torch::randint(0, 60, {8, 8, 1}, gen, torch::kInt64);
      img.slice(0, c * stride, c * stride + rows) += 180;
      write_png(dir + "/cls" + std::to_string(c) + "/" + std::to_string(k) + ".png", img.to(torch::kUInt8));
    }
  }
}

// The tiny pipeline of the end-to-end tests: 3 classes x 8 grey 8x8 images under `root`/images
// (written by write_band_images), a 2-block DiT, a few steps of everything.
DistillConfig tiny_config(const std::string& root) {
  DistillConfig c = parse_config(R"({
    "name": "tiny", "data": {"kind": "imagefolder", "spec": "", "nclass": 3, "image_size": 8},
    "codec": {"kind": "identity", "batch_size": 5},
    "model": {"name": "custom", "input_size": 8, "patch_size": 2, "in_channels": 1, "hidden_size": 32, "depth": 2,
              "num_heads": 2, "num_classes": 3},
    "pretrain": {"steps": 4, "batch_size": 6, "lr": 0.001, "ckpt_every": 2},
    "finetune": {"steps": 4, "batch_size": 6, "gamma_blocks": 1, "memory_size": 4, "ckpt_every": 2},
    "sample": {"ipc": 2, "steps": "5", "cfg_scale": 2.0, "batch_size": 4, "guidance": "all",
               "candidates": 2},
    "evaluate": {"protocol": "dc", "repeats": 2, "epochs": 2, "methods": ["random", "dit", "difffit", "minimax"]}
  })");
  c.data.root = root + "/images";
  c.data.test_root = root + "/images";
  return c;
}

}  // namespace

// The whole pipeline on 3 classes x 8 grey 8x8 images: pretrain, both fine-tunes, sampling,
// evaluation, report; then a re-run reuses every stage.
TEST(Pipeline, TinyEndToEndAndReuse) {
  const std::string root = mdd_test::tmp_dir("pipeline_e2e");
  write_band_images(root + "/images", 3, 8, /*stride=*/2, /*rows=*/3, /*seed=*/5);
  DistillConfig c = tiny_config(root);
  c.output_dir = root + "/out";
  std::vector<std::string> lines;
  PipelineCallbacks cb;
  cb.log = [&](const std::string& l) { lines.push_back(l); };
  const std::string report_path = run_distill(c, {}, cb);
  std::ifstream in(report_path);
  nlohmann::json r = nlohmann::json::parse(in);
  EXPECT_EQ(r["ipc"], 2);
  EXPECT_EQ(r["protocol"], "dc");
  for (const char* m : {"random", "dit", "difffit", "minimax"}) {
    ASSERT_TRUE(r["results"].contains(m)) << m;
    EXPECT_EQ(r["results"][m]["runs"].size(), 2u);
    const double mean = r["results"][m]["mean"];
    EXPECT_GE(mean, 0.0);
    EXPECT_LE(mean, 100.0);
  }
  EXPECT_TRUE(r["timings_s"].contains("finetune_minimax"));
  for (int cl = 0; cl < 3; ++cl)
    for (int k = 0; k < 2; ++k)
      EXPECT_TRUE(fs::exists(c.output_dir + "/samples/cls" + std::to_string(cl) + "/" + std::to_string(k) + ".png"));
  EXPECT_TRUE(fs::exists(c.output_dir + "/samples-dit/samples.safetensors"));
  EXPECT_TRUE(fs::exists(c.output_dir + "/contact_sheet.png"));
  EXPECT_TRUE(fs::exists(c.output_dir + "/report.md"));
  EXPECT_TRUE(fs::exists(c.output_dir + "/config.json"));
  EXPECT_EQ(list_checkpoints(c.output_dir + "/minimax/checkpoints").back().step, 4);
  // Minimax memories are checkpointed; the DiffFit-only run has none.
  auto ck = read_latest_checkpoint(c.output_dir + "/minimax/checkpoints");
  ASSERT_TRUE(ck.has_value());
  EXPECT_TRUE(ck->tensors.count("bank.real.capacity"));
  EXPECT_FALSE(read_latest_checkpoint(c.output_dir + "/difffit/checkpoints")->tensors.count("bank.real.capacity"));
  // The fine-tuned EMA weights carry DiffFit gammas and load into the configured model.
  EXPECT_NO_THROW(load_model(c.model, c.output_dir + "/minimax/ema.safetensors"));

  // Second run: everything is reused.
  lines.clear();
  run_distill(c, {}, cb);
  int reused = 0;
  for (const auto& l : lines) reused += l.find("reusing") != std::string::npos;
  EXPECT_GE(reused, 1 + 2 + 3 + 4) << "pretrain, 2 fine-tunes, 3 sample sets, 4 evaluations";

  // Every finished evaluation repeat was kept: an evaluation cut short (here: its result and one of
  // its repeats gone) runs only the missing repeat and gives the same result.
  int repeat_files = 0;
  std::string minimax_repeat;
  for (const auto& e : fs::directory_iterator(c.output_dir + "/eval/repeats")) {
    ++repeat_files;
    if (e.path().filename().string().rfind("evaluate-minimax-s", 0) == 0) minimax_repeat = e.path().string();
  }
  EXPECT_EQ(repeat_files, 4 * 2) << "4 evaluations x 2 repeats";
  ASSERT_FALSE(minimax_repeat.empty());
  fs::remove(minimax_repeat);
  fs::remove(c.output_dir + "/eval/minimax.json");
  lines.clear();
  const std::string again_path = run_distill(c, {}, cb);
  std::ifstream again_in(again_path);
  const nlohmann::json again = nlohmann::json::parse(again_in);
  EXPECT_EQ(again["results"]["minimax"]["runs"], r["results"]["minimax"]["runs"]);
  int partly = 0;
  for (const auto& l : lines) partly += l.find("evaluate-minimax: 1 of 2 repeats reused") != std::string::npos;
  EXPECT_EQ(partly, 1);

  // A longer fine-tune continues from the last checkpoint instead of starting over.
  c.finetune.steps = 6;
  lines.clear();
  run_distill(c, {}, cb);
  bool resumed = false;
  for (const auto& l : lines) resumed |= l.find("finetune-minimax: resumed from step 4") != std::string::npos;
  EXPECT_TRUE(resumed);

  // Changing a fine-tuning setting invalidates that stage (and its checkpoints) only.
  c.finetune.lambda_d = 0.5;
  lines.clear();
  run_distill(c, {}, cb);
  bool refit = false, difffit_reused = false;
  for (const auto& l : lines) {
    refit |= l.find("finetune-minimax: 6 steps") != std::string::npos;
    difffit_reused |= l.find("finetune-difffit: reusing") != std::string::npos;
    EXPECT_EQ(l.find("finetune-minimax: resumed"), std::string::npos) << l;
  }
  EXPECT_TRUE(refit);
  EXPECT_TRUE(difffit_reused) << "lambda_d cannot change the DiffFit-only run";
  // The superseded checkpoints were moved aside (reported), not deleted.
  bool moved = false;
  for (const auto& l : lines) {
    if (l.find("moved to") == std::string::npos || l.find("superseded") == std::string::npos) continue;
    moved = true;
    // ... and the report says which setting changed.
    EXPECT_NE(l.find("finetune.lambda_d: "), std::string::npos) << l;
    EXPECT_NE(l.find(" -> 0.5"), std::string::npos) << l;
  }
  EXPECT_TRUE(moved);
  ASSERT_TRUE(fs::is_directory(c.output_dir + "/minimax/superseded"));
  int kept = 0;
  for (const auto& e : fs::directory_iterator(c.output_dir + "/minimax/superseded"))
    kept += int(list_checkpoints(e.path().string()).size());
  EXPECT_GE(kept, 1);

  // A signature file that cannot be read must stop the run, not cost the checkpoints it guards.
  c.finetune.lambda_d = 0.25;
  const std::string sig = c.output_dir + "/minimax/signature.json";
  fs::remove(sig);
  fs::create_directory(sig);  // unreadable as a file
  const auto before = list_checkpoints(c.output_dir + "/minimax/checkpoints").size();
  ASSERT_GT(before, 0u);
  EXPECT_THROW(run_distill(c, {}, cb), Error);
  EXPECT_EQ(list_checkpoints(c.output_dir + "/minimax/checkpoints").size(), before);
}

// Records the pipeline's log lines; count(needle) = how many contain `needle`.
struct LogLines {
  std::vector<std::string> lines;
  PipelineCallbacks callbacks() {
    PipelineCallbacks cb;
    cb.log = [this](const std::string& l) { lines.push_back(l); };
    return cb;
  }
  int count(const std::string& needle) const {
    int n = 0;
    for (const auto& l : lines) n += l.find(needle) != std::string::npos;
    return n;
  }
  void clear() { lines.clear(); }
};

// Candidate selection (`sample.candidates` > 1): ipc images per class are kept out of
// candidates * ipc generated ones; the base draw (the streams of a run without candidates) is among
// the candidates; herding toward the real class means brings the kept images' mean embedding closer
// to the real one than the base draw; a re-run reuses the kept set without training the feature
// network again.
TEST(Pipeline, SamplingKeepsTheBestCandidates) {
  const std::string root = mdd_test::tmp_dir("pipeline_candidates");
  write_band_images(root + "/images", 3, 8, /*stride=*/2, /*rows=*/3, /*seed=*/5);
  DistillConfig c = tiny_config(root);
  c.output_dir = root + "/out";
  c.sample.candidates = 1;
  const PipelineData data = load_pipeline_data(c);
  const std::string weights = run_pretrain(c, data);
  const LabeledImages base = run_sample(c, data, weights, root + "/base");
  const auto base_st = io::load_safetensors(root + "/base/samples.safetensors").tensors;
  ASSERT_TRUE(base_st.count("stream_ids"));
  EXPECT_TRUE(torch::equal(base_st.at("stream_ids"), torch::arange(6, torch::kInt64)));

  c.sample.candidates = 4;
  c.sample.select = "herding";
  LogLines log;
  const LabeledImages kept = run_sample(c, data, weights, root + "/kept", "sample", log.callbacks());
  EXPECT_EQ(log.count("training the selection feature network"), 1);
  ASSERT_EQ(kept.images.size(0), 6);
  EXPECT_TRUE(torch::equal(kept.labels, torch::tensor({0, 0, 1, 1, 2, 2}, torch::kInt64)));
  const auto st = io::load_safetensors(root + "/kept/samples.safetensors").tensors;
  const auto ids = st.at("stream_ids");
  ASSERT_EQ(ids.numel(), 6);
  EXPECT_EQ(std::get<0>(torch::_unique(ids)).numel(), 6) << "a candidate kept twice";
  EXPECT_GE(ids.min().item<int64_t>(), 0);
  EXPECT_LT(ids.max().item<int64_t>(), 3 * 2 * 4);
  for (int64_t i = 0; i < 6; ++i) {
    const int64_t id = ids[i].item<int64_t>(), cls = kept.labels[i].item<int64_t>();
    if (id < 6) {
      // A base-draw candidate: the same image a run without candidates produced (batching differs).
      EXPECT_EQ(id / 2, cls);
      EXPECT_TRUE(torch::allclose(st.at("latents")[i], base_st.at("latents")[id], 1e-4, 1e-4)) << id;
    } else {
      EXPECT_EQ((id - 6) / 6, cls) << "extra candidates of class c follow the base ids: 6 + c * ipc * 3 + j";
    }
  }
  for (int cl = 0; cl < 3; ++cl)
    for (int k = 0; k < 2; ++k)
      EXPECT_TRUE(fs::exists(root + "/kept/cls" + std::to_string(cl) + "/" + std::to_string(k) + ".png"));
  const auto sc = nlohmann::json::parse(std::ifstream(root + "/kept/sample_config.json"));
  EXPECT_EQ(sc["selection"]["candidates"], 4);
  EXPECT_EQ(sc["selection"]["kept_stream_ids"].size(), 6u);

  // The same feature network, trained through the public evaluator (protocol, 1 epoch, seed + 1000).
  EvalOptions fo;
  fo.protocol(c.evaluate.protocol).epochs(c.sample.select_epochs).repeats(1).eval_every(0);
  const Evaluator fe(fo);
  double best = 0, last = 0;
  auto net = fe.train_once(data.train, data.test, c.sample.seed + 1000, &best, &last);
  const auto r = fe.resolve(data.train, data.test);
  const auto real_means = class_means(Evaluator::embed(net, Evaluator::prepare(data.train.images, r)), data.train.labels, 3);
  auto gap = [&](const LabeledImages& set) {
    const auto f = Evaluator::embed(net, Evaluator::prepare(set.images, r)).to(torch::kFloat64);
    double total = 0;
    for (int64_t cl = 0; cl < 3; ++cl)
      total += (f.index({set.labels == cl}).mean(0) - real_means[cl]).norm().item<double>();
    return total;
  };
  EXPECT_LT(gap(kept), gap(base)) << "herding must move the kept set toward the real class means";

  // Re-run: reused as it is, no feature network trained.
  log.clear();
  const LabeledImages again = run_sample(c, data, weights, root + "/kept", "sample", log.callbacks());
  EXPECT_EQ(log.count("reusing"), 1);
  EXPECT_EQ(log.count("training the selection feature network"), 0);
  EXPECT_TRUE(torch::equal(again.images, kept.images));

  // Another candidate count in the same run folder: the feature network cached under
  // <output_dir>/cache is reused, not trained again.
  c.sample.candidates = 3;
  log.clear();
  EXPECT_EQ(run_sample(c, data, weights, root + "/kept3", "sample", log.callbacks()).images.size(0), 6);
  EXPECT_EQ(log.count("training the selection feature network"), 0);
  EXPECT_EQ(log.count("reusing the selection feature network"), 1);
  EXPECT_TRUE(fs::exists(c.output_dir + "/cache/select_features.safetensors"));

  // The feature network on a per-class subset of the real images: its own cache entry, recorded
  // in the sample config; a count above the smallest class means all images (the cached network).
  EXPECT_EQ(sc["selection"]["feature_network"]["images"], data.train.images.size(0));
  c.sample.select_per_class = 3;
  log.clear();
  run_sample(c, data, weights, root + "/part", "sample", log.callbacks());
  EXPECT_EQ(log.count("training the selection feature network (dc protocol, 1 epoch on 3 per class, 9 of " +
                      std::to_string(data.train.images.size(0)) + " real images)"), 1);
  const auto sc_part = nlohmann::json::parse(std::ifstream(root + "/part/sample_config.json"));
  EXPECT_EQ(sc_part["selection"]["feature_network"]["images"], 9);
  c.sample.select_per_class = 1000;
  log.clear();
  run_sample(c, data, weights, root + "/all", "sample", log.callbacks());
  EXPECT_EQ(log.count("reusing the selection feature network"), 1);
  EXPECT_NE(error_of([&] { apply_override(c, "sample.select_per_class=-1"); }).find("sample.select_per_class"),
            std::string::npos);
  c.sample.select_per_class = 0;

  // Random selection needs no feature network; bad values name the key.
  c.sample.select = "random";
  log.clear();
  EXPECT_EQ(run_sample(c, data, weights, root + "/random", "sample", log.callbacks()).images.size(0), 6);
  EXPECT_EQ(log.count("training the selection feature network"), 0);
  EXPECT_NE(error_of([&] { apply_override(c, "sample.candidates=0"); }).find("sample.candidates"), std::string::npos);
  EXPECT_NE(error_of([&] { apply_override(c, "sample.select=best"); }).find("sample.select"), std::string::npos);
  EXPECT_NE(error_of([&] { apply_override(c, "sample.select_epochs=0"); }).find("sample.select_epochs"),
            std::string::npos);
}


// A two-class 8x8 image-folder run on a VAE codec with 2x4x4 latents, sized to finish in seconds. The
// caller names the VAE (codec.encoder) or sets up the vae section; the run validates the result.
DistillConfig tiny_vae_run(const std::string& root, uint64_t image_seed = 7, bool write_images = true) {
  if (write_images) write_band_images(root + "/images", 2, 4, /*stride=*/4, /*rows=*/4, image_seed);
  DistillConfig c = parse_config(R"({
    "name": "tiny-vae", "data": {"kind": "imagefolder", "spec": "", "nclass": 2, "image_size": 8},
    "codec": {"kind": "identity", "batch_size": 4},
    "model": {"name": "custom", "input_size": 4, "patch_size": 2, "in_channels": 2, "hidden_size": 16, "depth": 1,
              "num_heads": 2, "num_classes": 2},
    "pretrain": {"steps": 2, "batch_size": 4, "lr": 0.001, "ckpt_every": 2},
    "finetune": {"steps": 2, "batch_size": 4, "gamma_blocks": 1, "memory_size": 4, "ckpt_every": 2},
    "sample": {"ipc": 1, "steps": "3", "cfg_scale": 2.0, "batch_size": 2, "guidance": "all"}
  })");
  c.codec.kind = "vae";
  c.data.root = root + "/images";
  c.data.test_root = root + "/images";
  c.output_dir = root + "/out";
  return c;
}

// Rank 1 of Pipeline.TwoProcessesMatchOne.
TEST(PipelineDistChild, Run) {
  const char* root = std::getenv("MDD_PIPE_ROOT");
  if (!std::getenv("MDD_DIST_CHILD") || !root) GTEST_SKIP() << "helper of Pipeline.TwoProcessesMatchOne";
  torch::set_num_threads(1);
  DistillConfig c = tiny_config(root);
  c.output_dir = std::string(root) + "/out2";
  DistillRunOptions ro;
  ro.process_group = dist::ProcessGroup(dist::DistOptions::from_env());
  run_distill(c, ro, {});
}

// The whole pipeline on 2 processes (data-parallel pre-training and fine-tunes, sharded sampling,
// one pool of evaluation jobs) against 1 process: the same report, with each result under its
// own method.
TEST(Pipeline, TwoProcessesMatchOne) {
  if (!dist::distributed_available()) GTEST_SKIP() << "built without c10d/Gloo (MDD_WITH_DIST)";
  const int threads = torch::get_num_threads();
  torch::set_num_threads(1);
  const std::string root = mdd_test::tmp_dir("pipeline_dist");
  write_band_images(root + "/images", 3, 8, /*stride=*/2, /*rows=*/3, /*seed=*/5);
  DistillConfig c = tiny_config(root);
  c.output_dir = root + "/out1";
  const nlohmann::json one = nlohmann::json::parse(std::ifstream(run_distill(c, {}, {})));

  const int port = mdd_test::free_port();
  const pid_t kid = mdd_test::spawn_rank("PipelineDistChild.Run", 1, 2, port, {"MDD_PIPE_ROOT=" + root});
  ASSERT_GT(kid, 0);
  nlohmann::json two;
  try {
    c.output_dir = root + "/out2";
    DistillRunOptions ro;
    ro.process_group =
        dist::ProcessGroup(dist::DistOptions().rank(0).world_size(2).master_port(port).timeout(std::chrono::seconds(60)));
    two = nlohmann::json::parse(std::ifstream(run_distill(c, ro, {})));
  } catch (const std::exception& e) {
    ADD_FAILURE() << e.what();
  }
  EXPECT_EQ(mdd_test::wait_child(kid, 120), 0) << "rank 1 failed";
  EXPECT_EQ(torch::get_num_threads(), 1) << "the borrowed threads were not given back";
  torch::set_num_threads(threads);
  ASSERT_TRUE(two.is_object());
  // Random real images do not depend on any training: exactly equal, in the right place.
  EXPECT_EQ(two["results"]["random"]["runs"], one["results"]["random"]["runs"]);
  for (const char* m : {"dit", "difffit", "minimax"}) {
    ASSERT_TRUE(two["results"].contains(m)) << m;
    EXPECT_EQ(two["results"][m]["runs"].size(), 2u) << m;
  }
  // Rank 0 trained the selection's feature network alone, with its own thread and the one of
  // the rank that waited meanwhile (both on this machine).
  auto selection_of = [&](const std::string& out) {
    return nlohmann::json::parse(std::ifstream(root + "/" + out + "/samples/sample_config.json"))["selection"];
  };
  EXPECT_EQ(selection_of("out1")["threads"], 1);
  EXPECT_EQ(selection_of("out2")["threads"], 2);
  // Training on 2 ranks sums gradients in another order (differences ~1e-6), so the generated
  // images agree to well under a grey level before rounding.
  for (const char* set : {"samples-dit", "samples-difffit", "samples"}) {
    const auto a = io::load_safetensors(root + "/out1/" + set + "/samples.safetensors").tensors;
    const auto b = io::load_safetensors(root + "/out2/" + set + "/samples.safetensors").tensors;
    ASSERT_EQ(a.size(), b.size()) << set;
    for (const auto& kv : a) {
      ASSERT_TRUE(b.count(kv.first)) << set << " " << kv.first;
      if (!kv.second.is_floating_point()) {
        EXPECT_TRUE(torch::equal(kv.second, b.at(kv.first))) << set << " " << kv.first;
      } else {
        EXPECT_LT((kv.second - b.at(kv.first)).abs().max().item<double>(), 1e-3) << set << " " << kv.first;
      }
    }
  }
}

// The codec-training run of Pipeline.TrainsTheCodecOnTwoProcesses: a VAE (3 joint + 2 decoder-only
// steps) trained by the pipeline, then the DiT on its latents; no evaluation.
DistillConfig vae_training_run(const std::string& root, const std::string& out, bool write_images) {
  DistillConfig c = tiny_vae_run(root, /*image_seed=*/3, write_images);
  c.vae = parse_config(R"({"codec": {"kind": "vae"}, "model": {"in_channels": 2},
    "vae": {"steps": 3, "decoder_steps": 2, "batch_size": 4, "block_out_channels": [8, 8], "latent_channels": 2,
            "norm_num_groups": 4, "ckpt_every": 2, "lr_warmup": 1}})").vae;
  c.model.checkpoint = "";
  c.evaluate.methods = {"minimax"};
  c.output_dir = root + "/" + out;
  return c;
}

TEST(PipelineDistChild, Vae) {
  const char* root = std::getenv("MDD_PIPE_ROOT");
  if (!std::getenv("MDD_DIST_CHILD") || !root) GTEST_SKIP() << "helper of Pipeline.TrainsTheCodecOnTwoProcesses";
  torch::set_num_threads(1);
  DistillRunOptions ro;
  ro.skip_evaluate = true;
  ro.process_group = dist::ProcessGroup(dist::DistOptions::from_env());
  run_distill(vae_training_run(root, "out2", false), ro, {});
}

// The codec stage on 2 processes (data-parallel VaeTrainer, joint and decoder-only steps; rank 0
// writes the folder) gives the single-process VAE up to float summation order.
TEST(Pipeline, TrainsTheCodecOnTwoProcesses) {
  if (!dist::distributed_available()) GTEST_SKIP() << "built without c10d/Gloo (MDD_WITH_DIST)";
  const int threads = torch::get_num_threads();
  torch::set_num_threads(1);
  const std::string root = mdd_test::tmp_dir("pipeline_dist_vae");
  DistillRunOptions ro;
  ro.skip_evaluate = true;
  run_distill(vae_training_run(root, "out1", true), ro, {});
  const int port = mdd_test::free_port();
  const pid_t kid = mdd_test::spawn_rank("PipelineDistChild.Vae", 1, 2, port, {"MDD_PIPE_ROOT=" + root});
  ASSERT_GT(kid, 0);
  LogLines lines;
  try {
    ro.process_group =
        dist::ProcessGroup(dist::DistOptions().rank(0).world_size(2).master_port(port).timeout(std::chrono::seconds(60)));
    run_distill(vae_training_run(root, "out2", false), ro, lines.callbacks());
  } catch (const std::exception& e) {
    ADD_FAILURE() << e.what();
  }
  EXPECT_EQ(mdd_test::wait_child(kid, 120), 0) << "rank 1 failed";
  torch::set_num_threads(threads);
  EXPECT_EQ(lines.count("on 2 processes"), 1);
  EXPECT_EQ(lines.count("vae: fine-tuning the decoder for 2 steps"), 1);
  auto a = state_dict(*AutoencoderKL::from_pretrained(root + "/out1/vae/pretrained"));
  auto b = state_dict(*AutoencoderKL::from_pretrained(root + "/out2/vae/pretrained"));
  ASSERT_EQ(a.size(), b.size());
  for (const auto& kv : a) {
    // The attention key bias has a zero true gradient (softmax shift invariance): Adam turns its
    // float noise into ~lr steps that depend on summation order (see test_dist_train.cpp).
    if (kv.first.find("to_k.bias") != std::string::npos) continue;
    EXPECT_TRUE(torch::allclose(kv.second, b.at(kv.first), 1e-4, 2e-5)) << kv.first;
  }
}

TEST(Pipeline, VaeCodecCachesFollowTheWeightsContent) {
  // Latents, pre-training, fine-tuning and samples all depend on the VAE. Retraining it in place
  // (same folder, new weights) must redo them, not silently reuse what the old VAE made.
  const std::string root = mdd_test::tmp_dir("pipeline_vae_stamp");
  auto make_vae = [&](double scale) {
    AutoencoderKL vae(AutoencoderKLOptions().in_channels(3).out_channels(3).latent_channels(2)
                          .block_out_channels({8, 8}).layers_per_block(1).norm_num_groups(4).sample_size(8));
    torch::NoGradGuard ng;
    for (auto& p : vae->parameters()) p.mul_(scale);
    save_pretrained(vae, root + "/vae");
  };
  make_vae(1.0);
  DistillConfig c = tiny_vae_run(root);
  c.codec.encoder = root + "/vae";
  c.evaluate.methods = {"dit", "minimax"};
  DistillRunOptions ro;
  ro.skip_evaluate = true;
  LogLines lines;
  const PipelineCallbacks cb = lines.callbacks();
  auto count = [&](const std::string& needle) { return lines.count(needle); };
  run_distill(c, ro, cb);
  lines.clear();
  run_distill(c, ro, cb);
  EXPECT_EQ(count("latents: encoded"), 0);
  EXPECT_EQ(count("pretrain: reusing"), 1);
  EXPECT_EQ(count("finetune-minimax: reusing"), 1);

  make_vae(0.5);  // same folder, other weights
  lines.clear();
  run_distill(c, ro, cb);
  EXPECT_EQ(count("latents: encoded"), 1);
  EXPECT_EQ(count("pretrain: reusing"), 0);
  EXPECT_EQ(count("finetune-minimax: reusing"), 0);
  EXPECT_EQ(count(": reusing"), 0) << "no stage may reuse outputs made with the old VAE";
}

TEST(Pipeline, TrainsTheCodecWhenAsked) {
  // codec.encoder empty + vae.steps > 0: the run trains a VAE, encodes with it and pre-trains the
  // DiT on its latents; a second run reuses all of it; --pretrain with a named VAE trains one too.
  const std::string root = mdd_test::tmp_dir("pipeline_vae_train");
  DistillConfig c = tiny_vae_run(root, /*image_seed=*/3);
  c.vae = parse_config(R"({"codec": {"kind": "vae"}, "model": {"in_channels": 2},
    "vae": {"steps": 3, "batch_size": 4, "block_out_channels": [8, 8], "latent_channels": 2, "norm_num_groups": 4,
            "ckpt_every": 2, "lr_warmup": 1}})").vae;
  c.model.checkpoint = "/nonexistent/was-trained-on-another-codec.safetensors";
  c.evaluate.methods = {"minimax"};
  c.evaluate.protocol = "dc";
  DistillRunOptions ro;
  ro.skip_evaluate = true;
  LogLines lines;
  const PipelineCallbacks cb = lines.callbacks();
  auto count = [&](const std::string& needle) { return lines.count(needle); };
  run_distill(c, ro, cb);
  const std::string folder = root + "/out/vae/pretrained";
  EXPECT_EQ(count("vae: wrote " + folder), 1);
  EXPECT_EQ(count("reconstruction PSNR"), 1);
  EXPECT_EQ(count("pretrain: wrote"), 1) << "the DiT must learn the new VAE's latents, not load model.checkpoint";
  EXPECT_EQ(count("latents: encoded"), 1);
  AutoencoderKL vae = AutoencoderKL::from_pretrained(folder);
  EXPECT_EQ(vae->options.block_out_channels(), (std::vector<int64_t>{8, 8}));
  EXPECT_GT(vae->options.scaling_factor(), 0.0);
  // The resolved config of the run names the trained codec.
  const DistillConfig written = load_config(root + "/out/config.json");
  EXPECT_EQ(written.codec.encoder, folder);

  lines.clear();
  run_distill(c, ro, cb);
  EXPECT_EQ(count("vae: reusing"), 1);
  EXPECT_EQ(count("pretrain: reusing"), 1);
  EXPECT_EQ(count("latents: encoded"), 0);

  // Decoder-only steps after the joint ones: the joint checkpoints are reused, the encoder (and so
  // the latents and scaling factor) stays bit-identical, the decoder moves.
  const auto joint = state_dict(*vae);
  c.vae.decoder_steps = 2;
  lines.clear();
  run_distill(c, ro, cb);
  EXPECT_EQ(count("vae: fine-tuning the decoder for 2 steps"), 1);
  EXPECT_EQ(count("vae: resumed at step 3"), 1);
  AutoencoderKL tuned = AutoencoderKL::from_pretrained(folder);
  EXPECT_DOUBLE_EQ(tuned->options.scaling_factor(), vae->options.scaling_factor());
  bool decoder_moved = false;
  for (const auto& kv : state_dict(*tuned)) {
    const bool enc = kv.first.rfind("encoder.", 0) == 0 || kv.first.rfind("quant_conv.", 0) == 0;
    const bool same = torch::equal(kv.second, joint.at(kv.first));
    if (enc) EXPECT_TRUE(same) << kv.first;
    decoder_moved |= !enc && !same;
  }
  EXPECT_TRUE(decoder_moved);
  // A longer joint run makes the decoder checkpoints stale: they are set aside, not resumed.
  c.vae.steps = 4;
  lines.clear();
  run_distill(c, ro, cb);
  EXPECT_EQ(count("vae: decoder fine-tune resumed"), 0);
  EXPECT_EQ(count("decoder: checkpoints of a run with other settings"), 1);
  EXPECT_EQ(count("vae: fine-tuning the decoder for 2 steps"), 1);
  c.vae.steps = 3;
  c.vae.decoder_steps = 0;

  // A named VAE is used as it is unless --pretrain asks for the codec to be redone.
  DistillConfig named = c;
  named.codec.encoder = folder;
  named.model.checkpoint = "";
  named.output_dir = root + "/out-named";
  lines.clear();
  run_distill(named, ro, cb);
  EXPECT_EQ(count("vae: "), 0);
  ro.force_pretrain = true;
  lines.clear();
  run_distill(named, ro, cb);
  EXPECT_EQ(count("vae: wrote " + root + "/out-named/vae/pretrained"), 1);
  EXPECT_THROW(train_vae(parse_config(R"({"codec": {"kind": "identity"}})"), PipelineData{}), Error);
}

TEST(Pipeline, ClearErrors) {
  DistillConfig c = parse_config(R"({"data": {"kind": "imagefolder", "root": "/nonexistent/dir"},
                                     "codec": {"kind": "identity"}})");
  c.output_dir = mdd_test::tmp_dir("pipeline_err");
  EXPECT_THROW(run_distill(c), Error);
  ModelConfig m;
  m.name = "custom";
  EXPECT_THROW(load_model(m, "/nonexistent.safetensors"), Error);
}
