#include "mdd/pipeline/distill.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <functional>
#include <filesystem>
#include <mutex>
#include <optional>
#include <string>

#include <unistd.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "mdd/data/class_lists.h"
#include "mdd/data/fashion_mnist.h"
#include "mdd/data/image_folder.h"
#include "mdd/data/latent_cache.h"
#include "mdd/diffusion/sampler.h"
#include "mdd/eval/evaluator.h"
#include "mdd/eval/selection.h"
#include "mdd/io/image.h"
#include "mdd/io/safetensors.h"
#include "mdd/io/state_dict.h"
#include "mdd/io/weight_entry.h"
#include "mdd/models/autoencoder_kl.h"
#include "mdd/models/difffit.h"
#include "mdd/train/checkpoint.h"
#include "mdd/train/vae_trainer.h"
#include "mdd/util/error.h"
#include "mdd/util/threads.h"
#include "pipeline/config_json.h"
#include "pipeline/candidate_selection.h"
#include "pipeline/config_options.h"
#include "pipeline/report.h"
#include "pipeline/stage_cache.h"
#include "util/file_util.h"

namespace fs = std::filesystem;

namespace mdd {
namespace {

using detail::eval_from_json;
using detail::eval_json;

using json = nlohmann::json;
using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

void say(const PipelineCallbacks& cb, const std::string& line) {
  if (cb.log) cb.log(line);
}

json model_json(const ModelConfig& m) {
  return {{"name", m.name},           {"input_size", m.input_size}, {"patch_size", m.patch_size},
          {"in_channels", m.in_channels}, {"hidden_size", m.hidden_size}, {"depth", m.depth},
          {"num_heads", m.num_heads}, {"num_classes", m.num_classes}, {"class_dropout_prob", m.class_dropout_prob}};
}

int64_t gamma_blocks_in(const io::TensorMap& w) {
  int64_t n = 0;
  while (w.count(fmt::format("blocks.{}.gamma1", n))) ++n;
  return n;
}

torch::Device device_of(const std::string& d) {
  try {
    return torch::Device(d);
  } catch (const std::exception& e) {
    throw Error("config: 'device' is \"" + d + "\", not a torch device (" + e.what() + ")");
  }
}

// How long the other ranks wait while rank 0 does a job alone (encoding a dataset, training the
// codec): such jobs can take hours, and a rank 0 that exits ends the wait at once anyway.
constexpr std::chrono::hours kSoloWait{72};

// Runs `work` on rank 0 only; the others wait for it and then learn whether it succeeded, so a
// failure stops every rank with an error instead of leaving them in the next collective.
template <typename F>
void on_main(const dist::ProcessGroup& group_in, const std::string& what, F&& work) {
  dist::ProcessGroup group = group_in;  // a handle: copies share the group
  if (group.world_size() == 1) {
    work();
    return;
  }
  std::exception_ptr failed;
  if (group.is_main()) {
    try {
      work();
    } catch (...) {
      failed = std::current_exception();
    }
  }
  group.barrier(kSoloWait);
  torch::Tensor ok = torch::full({1}, failed ? 0 : 1, torch::kInt64);
  group.broadcast(ok, 0);
  if (failed) std::rethrow_exception(failed);
  if (ok.item<int64_t>() == 0) throw Error(what + " failed on rank 0 (see its log)");
}

// The intra-op threads of all ranks on rank 0's machine (rank 0's own count elsewhere). A
// collective: every rank calls it at the same point.
int threads_on_main_host(const dist::ProcessGroup& group_in) {
  dist::ProcessGroup group = group_in;  // a handle: copies share the group
  if (group.world_size() == 1) return at::get_num_threads();
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0) name[0] = '\0';
  const auto host = static_cast<int64_t>(std::hash<std::string>{}(name));
  torch::Tensor all = group.all_gather(torch::tensor({host, int64_t(at::get_num_threads())}, torch::kInt64).view({1, 2}));
  const auto a = all.accessor<int64_t, 2>();
  int64_t n = 0;
  for (int64_t r = 0; r < all.size(0); ++r)
    if (a[r][0] == a[0][0]) n += a[r][1];
  return int(std::max<int64_t>(1, std::min<int64_t>(n, 1024)));
}

// on_main for long jobs: while the ranks on rank 0's machine wait (blocked in the store, not
// spinning), their cores are idle, so rank 0 runs the job with all of their threads and then goes
// back to its own share. (Training selection's feature network on 1 of 2 cores took 691 s.)
template <typename F>
void on_main_borrowing(const dist::ProcessGroup& group, const std::string& what, F&& work) {
  const int threads = threads_on_main_host(group);
  on_main(group, what, [&] {
    if (threads <= at::get_num_threads()) return work();
    ScopedNumThreads borrowed(threads);
    work();
  });
}

ProgressFn staged(const PipelineCallbacks& cb, const std::string& stage) {
  if (!cb.progress) return {};
  auto p = cb.progress;
  return [p, stage](const Progress& e) {
    Progress q = e;
    q.stage = stage;
    p(q);
  };
}

}  // namespace

std::string sanitize_class_dir(const std::string& name) {
  std::string out;
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' || c == '_' || c == '.';
    out += ok ? c : '_';
  }
  if (out.empty() || out == "." || out == "..") out = "class";
  return out;
}

PipelineData load_pipeline_data(const DistillConfig& config, const PipelineCallbacks& cb) {
  PipelineData d;
  const auto& dc = config.data;
  if (parse_data_kind(dc.kind) == DataKind::kFashionMnist) {
    d.train = load_fashion_mnist(dc.root, "train");
    d.test = load_fashion_mnist(dc.root, "test");
    if (dc.nclass != 10) throw Error("config: 'data.nclass' must be 10 for Fashion-MNIST");
    for (const auto& n : d.train.class_names) d.class_dirs.push_back(sanitize_class_dir(n));
    for (int64_t c = 0; c < 10; ++c) d.model_labels.push_back(c);
    return d;
  }
  ImageFolderOptions fo;
  fo.spec(dc.spec).nclass(dc.nclass).phase(dc.phase).channels(config.model.in_channels == 1 ? 1 : 3);
  if (dc.spec.size() > 4 && dc.spec.compare(dc.spec.size() - 4, 4, ".txt") == 0) {
    // A class-list file (one folder name per line, e.g. data/class_lists/woof.txt), sliced like a spec.
    const auto all = read_class_list(dc.spec);
    if (int64_t(all.size()) < dc.nclass * (dc.phase + 1))
      throw Error(fmt::format("{}: {} classes, fewer than nclass * (phase + 1) = {}", dc.spec, all.size(),
                              dc.nclass * (dc.phase + 1)));
    fo.classes({all.begin() + dc.nclass * dc.phase, all.begin() + dc.nclass * (dc.phase + 1)}).spec("");
  }
  ImageFolder train(dc.root, fo);
  say(cb, fmt::format("data: {} training images of {} classes under {}", train.size(), train.classes().size(), dc.root));
  d.train = train.load(adm_transform(dc.image_size), dc.threads, staged(cb, "load_images"));
  d.class_dirs = train.classes();
  // DiT label = index of the synset in the sorted listing of the root (data.py find_original_classes),
  // which is the ImageNet index when the root is an ImageNet train dir.
  d.model_labels = train.dit_labels();
  if (!dc.test_root.empty()) {
    ImageFolderOptions to = fo;
    to.classes(train.classes()).spec("");
    ImageFolder test(dc.test_root, to);
    const int64_t size = config.evaluate.image_size > 0 ? config.evaluate.image_size
                                                          : (parse_eval_protocol(config.evaluate.protocol) == EvalProtocol::kIdc ? 224 : dc.image_size);
    d.test = test.load(resize_center_crop_transform(size), dc.threads, staged(cb, "load_test_images"));
  }
  for (auto l : d.model_labels)
    if (l < 0 || l >= config.model.num_classes)
      throw Error(fmt::format("data: class label {} is outside the model's {} classes (is data.root the full "
                              "ImageNet train folder?)", l, config.model.num_classes));
  return d;
}

DiT make_model(const ModelConfig& m, uint64_t seed) {
  DiT model(detail::dit_options_of(m));
  auto gen = at::detail::createCPUGenerator(seed);
  model->initialize_weights(gen);
  return model;
}

DiT load_model(const ModelConfig& config, const std::string& path, const std::string& entry) {
  if (path.empty()) throw Error("load_model: no weight file given");
  if (!fs::exists(path)) throw Error(path + ": model weights not found");
  io::TensorMap w = load_model_weights(path, entry);
  DiT model = make_model(config);
  const int64_t gb = gamma_blocks_in(w);
  if (gb > 0) apply_difffit(model, DiffFitOptions().gamma_blocks(gb));
  try {
    load_state_dict(*model, w, /*strict=*/true);
  } catch (const Error& e) {
    throw Error(path + ": weights do not fit the configured model (" + config.name + "): " + e.what());
  }
  return model;
}

std::shared_ptr<Codec> make_codec(const CodecConfig& c, const std::string& role, const std::string& device) {
  if (parse_codec_kind(c.kind) == CodecKind::kIdentity) return std::make_shared<IdentityCodec>();
  const std::string path = role == "decoder" && !c.decoder.empty() ? c.decoder : (c.encoder.empty() ? c.decoder : c.encoder);
  auto vae = AutoencoderKL::from_pretrained(path);
  return std::make_shared<VaeCodec>(vae, device_of(device));
}

namespace {

// What the codec's weights are, by content: "identity", or "vae:" + the content stamps of the files
// that define the encoder and decoder (a diffusers folder's config.json and weights, or one file).
// Part of every cache key downstream of the codec: retraining a VAE in place must not reuse latents,
// a pre-trained DiT or samples made with the old one.
std::string codec_identity(const CodecConfig& c) {
  if (parse_codec_kind(c.kind) == CodecKind::kIdentity) return "identity";
  auto stamp_of = [](const std::string& path) {
    std::error_code ec;
    if (!fs::is_directory(path, ec)) return path + "=" + file_content_stamp(path);
    std::vector<std::string> files;
    for (const auto& e : fs::directory_iterator(path, ec)) {
      const std::string name = e.path().filename().string();
      const std::string ext = e.path().extension().string();
      if (name == "config.json" || ext == ".safetensors" || ext == ".bin") files.push_back(name);
    }
    std::sort(files.begin(), files.end());
    std::string out = path;
    for (const auto& f : files) out += fmt::format(" {}={}", f, file_content_stamp((fs::path(path) / f).string()));
    return out;
  };
  const std::string enc = c.encoder.empty() ? c.decoder : c.encoder, dec = c.decoder.empty() ? enc : c.decoder;
  return "vae:" + stamp_of(enc) + (dec == enc ? std::string() : " | " + stamp_of(dec));
}

// Stage signatures carry the codec's identity only for VAE codecs, so the pixel-space signatures of
// runs made before the key existed stay valid.
void add_codec_identity(nlohmann::json& sig, const CodecConfig& c) {
  if (c.kind != "identity") sig["codec_identity"] = codec_identity(c);
}

}  // namespace

std::shared_ptr<LatentTrainingData> make_training_data(const DistillConfig& config, const PipelineData& data,
                                                       const PipelineCallbacks& cb, const dist::ProcessGroup& group) {
  auto codec = make_codec(config.codec, "encoder", config.device);
  const std::string path = (fs::path(config.output_dir) / "cache" / "latents.safetensors").string();
  LatentCacheOptions lo;
  lo.batch_size(config.codec.batch_size).device(device_of(config.device)).flip(true)
      .codec_tag(codec_identity(config.codec));
  const auto t0 = clock_type::now();
  // Rank 0 encodes (or finds) the cache file; the others then read it.
  std::optional<LatentCache> built;
  on_main_borrowing(group, "encoding the training latents", [&] {
    fs::create_directories(fs::path(path).parent_path());
    built = LatentCache::build(path, *codec, data.train, lo, staged(cb, "encode_latents"));
  });
  LatentCache cache = built ? *built : LatentCache::build(path, *codec, data.train, lo, staged(cb, "encode_latents"));
  say(cb, fmt::format("latents: {} {} ({:.1f} s)", cache.loaded_from_disk() ? "reused" : "encoded", path, seconds_since(t0)));
  const auto& shape = cache.mean().sizes();
  const auto& m = config.model;
  if (shape[2] != m.in_channels || shape[3] != m.input_size || shape[4] != m.input_size)
    throw Error(fmt::format("latents have shape [{}, {}, {}] but the model expects [{}, {}, {}] (check model.input_size / "
                            "model.in_channels against data.image_size and the codec)",
                            shape[2], shape[3], shape[4], m.in_channels, m.input_size, m.input_size));
  torch::Tensor subset = finetune_subset(cache.labels(), config.data.finetune_ipc);
  return std::make_shared<LatentTrainingData>(cache, int64_t(data.class_dirs.size()), data.model_labels, subset);
}

namespace {

bool trains_vae(const DistillConfig& config, bool force_pretrain) {
  return parse_codec_kind(config.codec.kind) == CodecKind::kVae && config.vae.steps > 0 &&
         (force_pretrain || (config.codec.encoder.empty() && config.codec.decoder.empty()));
}

// The codec is trained by all ranks together (data parallel, `VaeTrainerOptions::process_group`);
// rank 0 alone prepares the folders, measures the result and writes it.
std::string run_train_vae(const DistillConfig& config, const PipelineData& data, const PipelineCallbacks& cb,
                          const dist::ProcessGroup& group_in) {
  dist::ProcessGroup group = group_in;  // a handle: copies share the group
  const auto& v = config.vae;
  if (v.steps <= 0) throw Error("run_train_vae: config 'vae.steps' must be > 0");
  const fs::path dir = fs::path(config.output_dir) / "vae";
  const std::string folder = (dir / "pretrained").string();
  const std::string weights = (fs::path(folder) / "diffusion_pytorch_model.safetensors").string();
  json vae_section = detail::config_json(config)["vae"];
  if (v.decoder_steps == 0) vae_section.erase("decoder_steps");  // folders of runs that predate the key stay valid
  json sig = {{"vae", vae_section}, {"data", config.data.kind}, {"data_root", config.data.root},
              {"nclass", config.data.nclass}, {"phase", config.data.phase}, {"image_size", config.data.image_size}};
  const bool reuse = detail::load_stage_output(weights, sig.dump(), group.is_main() ? cb.log : LogFn()) &&
                     fs::exists(fs::path(folder) / "config.json");
  group.check_same("whether the trained codec can be reused", reuse ? "yes" : "no");
  if (reuse) {
    say(cb, "vae: reusing " + folder);
    return folder;
  }
  json resume_sig = sig;
  resume_sig["vae"].erase("steps");
  resume_sig["vae"].erase("ckpt_every");
  resume_sig["vae"].erase("decoder_steps");  // the joint checkpoints do not depend on it
  on_main(group, "preparing " + dir.string(),
          [&] { detail::prepare_stage_checkpoints(dir.string(), resume_sig.dump(), /*force=*/false, cb.log); });
  const torch::Tensor& images = data.train.images;
  AutoencoderKL vae{nullptr};
  {
    // PyTorch-default initialisation drawn from the global generator seeded with vae.seed (as
    // mdd_train_vae does), without leaving the caller's global generator changed.
    // (The generator's mutex is held only around our own state changes: the initialisers lock it
    // for every draw.)
    auto gen = at::detail::getDefaultCPUGenerator();
    torch::Tensor saved;
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      saved = gen.get_state();
      gen.set_current_seed(v.seed);
    }
    vae = AutoencoderKL(detail::vae_architecture_of(v, images.size(3), images.size(1)));
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(saved);
  }
  VaeTrainerOptions o = detail::vae_trainer_options_of(v);
  o.checkpoint_dir((dir / "checkpoints").string()).device(device_of(config.device)).process_group(group);
  VaeTrainer trainer(vae, data.train, o);
  if (trainer.resume(cb.log)) say(cb, fmt::format("vae: resumed at step {}", trainer.step_count()));
  say(cb, fmt::format("vae: training an AutoencoderKL {} (latent {}) for {} steps x {} images{}", json(v.block_out_channels).dump(),
                      v.latent_channels, v.steps, v.batch_size,
                      group.world_size() > 1 ? fmt::format(" on {} processes", group.world_size()) : std::string()));
  trainer.train(staged(cb, "train_vae"), [&](const VaeTrainStats& st) {
    say(cb, fmt::format("vae: step {}/{} loss {:.5f} (reconstruction {:.5f}, kl {:.3f}), {:.0f} images/s", st.step, st.total,
                        st.mean_loss, st.reconstruction, st.kl, st.images_per_s));
  }, "train_vae");
  AutoencoderKL trained = trainer.vae();
  // Rank 0 fits the factor; every rank needs it only through the folder written below.
  on_main_borrowing(group, "fitting the VAE scaling factor",
          [&] { trained->options.scaling_factor(fit_scaling_factor(trained, images)); });
  if (v.decoder_steps > 0) {
    // Decoder-only fine-tuning: the encoder, hence the latents and the factor fitted above, stay.
    // Its checkpoints live apart from the joint ones and are keyed by the joint run they start
    // from (settings and step count), so a changed or longer joint run never resumes stale ones.
    const fs::path dec_dir = dir / "decoder";
    json dec_sig = resume_sig;
    dec_sig["joint_steps"] = trainer.step_count();
    on_main(group, "preparing " + dec_dir.string(),
            [&] { detail::prepare_stage_checkpoints(dec_dir.string(), dec_sig.dump(), /*force=*/false, cb.log); });
    VaeTrainerOptions d = VaeTrainerOptions(o).steps(v.decoder_steps).train_encoder(false)
                              .checkpoint_dir((dec_dir / "checkpoints").string());
    VaeTrainer dec(trained, data.train, d);
    if (dec.resume(cb.log)) say(cb, fmt::format("vae: decoder fine-tune resumed at step {}", dec.step_count()));
    say(cb, fmt::format("vae: fine-tuning the decoder for {} steps (encoder frozen)", v.decoder_steps));
    dec.train(staged(cb, "train_vae_decoder"), [&](const VaeTrainStats& st) {
      say(cb, fmt::format("vae: decoder step {}/{} loss {:.5f} (reconstruction {:.5f}), {:.0f} images/s", st.step, st.total,
                          st.mean_loss, st.reconstruction, st.images_per_s));
    }, "train_vae_decoder");
    trained = dec.vae();
  }
  on_main(group, "writing " + folder, [&] {
    const torch::Tensor& test = data.test.images;
    if (test.defined() && test.dim() == 4 && test.size(0) > 0 && test.sizes().slice(1) == images.sizes().slice(1))
      say(cb, fmt::format("vae: reconstruction PSNR {:.2f} dB on the {} test images, scaling factor {:.4f}",
                          reconstruction_psnr(trained, test), test.size(0), trained->options.scaling_factor()));
    save_pretrained(trained, folder, {{"signature", sig.dump()}, {"steps", std::to_string(trainer.step_count())}});
    say(cb, "vae: wrote " + folder);
  });
  return folder;
}

using TrainingDataFn = std::function<std::shared_ptr<LatentTrainingData>()>;

// The stage bodies take the training data lazily: a reused stage never loads it, and run_distill
// hands every stage the one instance it built.
std::string pretrain_with(const DistillConfig& config, const TrainingDataFn& get_data, bool force,
                          const PipelineCallbacks& cb, const dist::ProcessGroup& group) {
  const fs::path dir = fs::path(config.output_dir) / "pretrain";
  const auto& p = config.pretrain;
  const std::string out = (dir / (p.use_ema ? "ema.safetensors" : "model.safetensors")).string();
  json sig = {{"model", model_json(config.model)}, {"steps", p.steps}, {"batch_size", p.batch_size}, {"lr", p.lr},
              {"ema_decay", p.ema_decay}, {"seed", p.seed}, {"data", config.data.kind}, {"codec", config.codec.kind},
              {"use_ema", p.use_ema}};
  // Later keys join the signature only when set, so outputs of earlier runs keep being reused.
  if (p.ema_warmup) sig["ema_warmup"] = true;
  if (p.lr_warmup > 0) sig["lr_warmup"] = p.lr_warmup;
  add_codec_identity(sig, config.codec);
  if (!force && detail::load_stage_output(out, sig.dump(), cb.log)) {
    say(cb, "pretrain: reusing " + out);
    return out;
  }
  // Other settings (or --force): the old checkpoints must not be resumed; they are set aside.
  json resume_sig = sig;
  resume_sig.erase("steps");
  resume_sig.erase("use_ema");
  on_main(group, "pretrain: preparing the checkpoint folder",
          [&] { detail::prepare_stage_checkpoints(dir.string(), resume_sig.dump(), force, cb.log); });
  auto train_data = get_data();
  FinetuneOptions o = detail::pretrain_options_of(config);
  o.checkpoint_dir((dir / "checkpoints").string()).device(device_of(config.device)).config_json(config_to_json(config))
      .process_group(group);
  Pretrainer trainer(make_model(config.model, p.seed), train_data, o);
  const bool resumed = trainer.resume(cb.log);
  if (resumed) say(cb, fmt::format("pretrain: resumed at step {}", trainer.step_count()));
  say(cb, fmt::format("pretrain: {} steps x {} images {}, {}", p.steps, p.batch_size,
                      resumed ? "(continuing the run above)" : "from scratch",
                      describe_precision(trainer.precision(), device_of(config.device))));
  trainer.train(staged(cb, "pretrain"), cb.train_log, "pretrain");
  on_main(group, "pretrain: writing " + out, [&] {
    io::save_safetensors(out, state_dict(p.use_ema ? *trainer.ema() : *trainer.model()),
                         {{"format", "mdd-dit"}, {"signature", sig.dump()}, {"model", model_json(config.model).dump()},
                          {"steps", std::to_string(trainer.step_count())}, {"weights", p.use_ema ? io::kEmaEntry : io::kModelEntry}});
  });
  say(cb, "pretrain: wrote " + out);
  return out;
}

std::string finetune_with(const DistillConfig& config, const TrainingDataFn& get_data, const std::string& init_weights,
                          const std::string& variant, const PipelineCallbacks& cb, const dist::ProcessGroup& group) {
  if (variant != "difffit" && variant != "minimax")
    throw Error("run_finetune: variant must be \"difffit\" or \"minimax\", got \"" + variant + "\"");
  const bool minimax = variant == "minimax";
  const fs::path dir = fs::path(config.output_dir) / variant;
  const std::string out = (dir / "ema.safetensors").string();
  const auto& f = config.finetune;
  json sig = {{"model", model_json(config.model)}, {"init", init_weights}, {"init_stamp", file_content_stamp(init_weights)},
              {"finetune", detail::config_json(config)["finetune"]}, {"minimax", minimax},
              {"finetune_ipc", config.data.finetune_ipc}};
  add_codec_identity(sig, config.codec);
  if (!minimax) {
    // The minimax weights and memory size cannot change a DiffFit-only run: a lambda sweep must
    // not redo the DiffFit baseline (or its evaluation).
    for (const char* k : {"lambda_r", "lambda_d", "memory_size"}) sig["finetune"].erase(k);
  }
  if (detail::load_stage_output(out, sig.dump(), cb.log)) {
    say(cb, fmt::format("finetune-{}: reusing {}", variant, out));
    return out;
  }
  // Checkpoints of a run with other settings (or another init) must not be resumed; a longer run
  // (more steps) or another checkpoint interval continues from them.
  json resume_sig = sig;
  resume_sig["finetune"].erase("steps");
  resume_sig["finetune"].erase("ckpt_every");
  resume_sig["finetune"].erase("precision");  // a run may continue in another precision
  on_main(group, "finetune-" + variant + ": preparing the checkpoint folder",
          [&] { detail::prepare_stage_checkpoints(dir.string(), resume_sig.dump(), /*force=*/false, cb.log); });
  auto train_data = get_data();
  FinetuneOptions o = detail::finetune_options_of(config, minimax);
  o.checkpoint_dir((dir / "checkpoints").string()).device(device_of(config.device)).config_json(config_to_json(config))
      .process_group(group);
  Finetuner trainer(load_model(config.model, init_weights), train_data, o);
  if (trainer.resume(cb.log)) say(cb, fmt::format("finetune-{}: resumed from step {}", variant, trainer.step_count()));
  say(cb, fmt::format("finetune-{}: {} steps x {} images, {}, DiffFit{}", variant, f.steps, f.batch_size,
                      describe_precision(trainer.precision(), device_of(config.device)),
                      minimax ? fmt::format(" + minimax (lambda_r {}, lambda_d {}, memory {})", f.lambda_r, f.lambda_d,
                                            f.memory_size)
                              : ""));
  trainer.train(staged(cb, "finetune-" + variant), cb.train_log, "finetune-" + variant);
  on_main(group, "finetune-" + variant + ": writing " + out, [&] {
    io::save_safetensors(out, state_dict(*trainer.ema()),
                         {{"format", "mdd-dit"}, {"signature", sig.dump()}, {"model", model_json(config.model).dump()},
                          {"steps", std::to_string(trainer.step_count())}});
  });
  say(cb, fmt::format("finetune-{}: wrote {}", variant, out));
  return out;
}

}  // namespace

std::string run_pretrain(const DistillConfig& config, const PipelineData& data, bool force, const PipelineCallbacks& cb,
                         const dist::ProcessGroup& group) {
  return pretrain_with(config, [&] { return make_training_data(config, data, cb, group); }, force, cb, group);
}

std::string run_finetune(const DistillConfig& config, const PipelineData& data, const std::string& init_weights,
                         const std::string& variant, const PipelineCallbacks& cb, const dist::ProcessGroup& group) {
  return finetune_with(config, [&] { return make_training_data(config, data, cb, group); }, init_weights, variant, cb,
                       group);
}

namespace {

LabeledImages sample_with(const DistillConfig& config, const PipelineData& data, const std::string& weights,
                          const std::string& out_dir, const std::string& stage, const PipelineCallbacks& cb,
                          const dist::ProcessGroup& group, const detail::SelectionSpaceFn& selection_space) {
  const auto& s = config.sample;
  const int64_t nclass = int64_t(data.class_dirs.size());
  const int64_t per_class = s.ipc * s.candidates;  // images generated per class
  const bool selects = s.candidates > 1;
  const json resolved = detail::config_json(config);
  json sig = {{"weights", weights}, {"stamp", file_content_stamp(weights)}, {"sample", resolved["sample"]},
              {"codec", resolved["codec"]}, {"model", model_json(config.model)}};
  // Later keys join the signature only when set, so samples of earlier runs keep being reused.
  if (s.cfg_interval.empty()) sig["sample"].erase("cfg_interval");
  if (s.eta == 0.0) sig["sample"].erase("eta");
  if (!selects) {
    for (const char* k : {"candidates", "select", "select_epochs", "select_per_class"}) sig["sample"].erase(k);
  } else {
    if (s.select == "random") sig["sample"].erase("select_epochs");
    // Random needs no feature network; 0 keeps the samples of runs made before the key valid.
    if (s.select == "random" || s.select_per_class == 0) sig["sample"].erase("select_per_class");
    // The feature network is trained on the real split under the evaluation protocol.
    if (s.select != "random") sig["select_features"] = {{"protocol", config.evaluate.protocol},
                                                        {"image_size", config.evaluate.image_size},
                                                        {"data", resolved["data"]}};
  }
  add_codec_identity(sig, config.codec);
  const std::string st_path = (fs::path(out_dir) / "samples.safetensors").string();
  if (auto st = detail::load_stage_output(st_path, sig.dump(), cb.log)) {
    if (st->tensors.count("images") && st->tensors.count("labels")) {
      say(cb, stage + ": reusing " + st_path);
      LabeledImages out;
      out.images = st->tensors.at("images");
      out.labels = st->tensors.at("labels");
      out.class_names = data.train.class_names;
      return out;
    }
  }
  const auto dev = device_of(config.device);
  DiT model = load_model(config.model, weights, s.entry);
  model->to(dev);
  model->eval();
  auto codec = make_codec(config.codec, "decoder", config.device);
  SamplerOptions so = detail::sampler_options_of(config, model->options().learn_sigma(), model->null_class());
  so.device(dev).process_group(group);  // several ranks: each denoises its share, all get every latent
  ConditionalModelFn fn = [model](const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& y) mutable {
    torch::NoGradGuard ng;
    return model->forward(x, t, y);
  };
  Sampler sampler(fn, so);
  std::vector<int64_t> local, dit, ids;
  for (int64_t c = 0; c < nclass; ++c)
    for (int64_t k = 0; k < per_class; ++k) {
      local.push_back(c);
      dit.push_back(data.model_labels[c]);
      // Image k of class c gets the same noise stream in every method (and with or without candidates).
      ids.push_back(detail::candidate_stream_id(c, k, s.ipc, s.candidates, nclass));
    }
  const auto t0 = clock_type::now();
  say(cb, fmt::format("{}: {} images ({} per class{}), {} {} steps, CFG {}{}", stage, local.size(), per_class,
                      selects ? fmt::format(": {} candidates for each of {} kept", s.candidates, s.ipc) : "", s.steps,
                      s.method, s.cfg_scale,
                      s.cfg_interval.size() == 2
                          ? fmt::format(" on timesteps [{}, {}]", s.cfg_interval[0], s.cfg_interval[1])
                          : std::string()));
  torch::Tensor latents =
      sampler.sample(torch::tensor(dit, torch::kInt64), torch::tensor(ids, torch::kInt64), staged(cb, stage)).to(torch::kCPU);
  // Decode in chunks; images in [-1, 1] -> uint8 as torchvision save_image.
  std::vector<torch::Tensor> imgs;
  {
    torch::NoGradGuard ng;
    for (int64_t b = 0; b < latents.size(0); b += config.codec.batch_size) {
      auto z = latents.slice(0, b, std::min(latents.size(0), b + config.codec.batch_size));
      auto x = codec->decode((z / codec->scaling_factor()).to(dev)).to(torch::kCPU, torch::kFloat32);
      if (!torch::isfinite(x).all().item<bool>())
        throw Error(stage + ": the sampler produced NaN/Inf images (diverged model weights in " + weights + "?)");
      imgs.push_back(to_uint8_image(x));
    }
  }
  torch::Tensor images = torch::cat(imgs, 0);
  torch::Tensor labels = torch::tensor(local, torch::kInt64);
  torch::Tensor stream_ids = torch::tensor(ids, torch::kInt64);
  torch::Tensor model_labels = torch::tensor(dit, torch::kInt64);
  json selection = nullptr;
  if (selects) {
    // Rank 0 selects (it alone trains the feature network); the others receive its choice.
    torch::Tensor keep = torch::zeros({nclass * s.ipc}, torch::kInt64);
    std::shared_ptr<const detail::SelectionSpace> space;
    on_main_borrowing(group, stage + ": selecting among the candidates", [&] {
      const auto t_sel = clock_type::now();
      keep = detail::select_candidates(s, images, labels, [&] { return space = selection_space(); });
      selection = {{"candidates", s.candidates}, {"method", s.select}, {"seconds", seconds_since(t_sel)},
                   {"threads", at::get_num_threads()}};
      if (space)
        selection["feature_network"] = {{"protocol", config.evaluate.protocol}, {"epochs", s.select_epochs},
                                        {"images", space->train_images},
                                        {"test_accuracy", space->test_accuracy}, {"train_seconds", space->seconds}};
    });
    dist::ProcessGroup(group).broadcast(keep, 0);  // a handle: the copy shares the group
    if (keep.numel() != nclass * s.ipc) throw Error(stage + ": the selection returned the wrong number of images");
    say(cb, fmt::format("{}: kept {} of {} images per class by {}{}", stage, s.ipc, per_class, s.select,
                        s.select == "herding" ? " toward the real class means" : ""));
    images = images.index_select(0, keep);
    latents = latents.index_select(0, keep);
    labels = labels.index_select(0, keep);
    stream_ids = stream_ids.index_select(0, keep);
    model_labels = model_labels.index_select(0, keep);
    if (selection.is_object()) selection["kept_stream_ids"] = std::vector<int64_t>(
        stream_ids.data_ptr<int64_t>(), stream_ids.data_ptr<int64_t>() + stream_ids.numel());
  }
  on_main(group, stage + ": writing " + out_dir, [&] {
  // <class>/<k>.png, k = the image's place in its class (its stream id without candidates).
  std::vector<int64_t> written(size_t(nclass), 0);
  const auto label_of = labels.accessor<int64_t, 1>();
  for (int64_t i = 0; i < images.size(0); ++i) {
    const int64_t c = label_of[i], k = written[size_t(c)]++;
    const fs::path p = fs::path(out_dir) / data.class_dirs[c] / fmt::format("{}.png", k);
    fs::create_directories(p.parent_path());
    write_png(p.string(), images[i]);
  }
  io::save_safetensors(st_path,
                       {{"latents", latents.contiguous()}, {"labels", labels}, {"model_labels", model_labels},
                        {"images", images.contiguous()}, {"stream_ids", stream_ids}},
                       {{"format", "mdd-samples"}, {"signature", sig.dump()}});
  {
    std::vector<torch::Tensor> rows;
    for (int64_t c = 0; c < nclass; ++c) rows.push_back(images.index({labels == c}).slice(0, 0, 20));
    write_png((fs::path(out_dir) / "grid.png").string(), detail::class_sheet(rows));
  }
  write_text_file_atomic((fs::path(out_dir) / "sample_config.json").string(),
             json({{"weights", weights}, {"sample", resolved["sample"]}, {"model", resolved["model"]}, {"codec", resolved["codec"]},
                   {"seeds", {{"seed", s.seed},
                              {"rule", selects ? "candidate j of class c uses stream id c*ipc+j for j < ipc, else "
                                                 "nclass*ipc + c*ipc*(candidates-1) + (j-ipc): "
                                                 "splitmix64(seed ^ splitmix64(id))"
                                               : "image k of class c uses stream id c*ipc+k: splitmix64(seed ^ splitmix64(id))"}}},
                   {"selection", selection},
                   {"seconds", seconds_since(t0)}})
                 .dump(2) + "\n");
  });
  say(cb, fmt::format("{}: wrote {} PNGs under {} ({:.1f} s)", stage, images.size(0), out_dir, seconds_since(t0)));
  LabeledImages out;
  out.images = images;
  out.labels = labels;
  out.class_names = data.train.class_names;
  return out;
}

}  // namespace

LabeledImages run_sample(const DistillConfig& config, const PipelineData& data, const std::string& weights,
                         const std::string& out_dir, const std::string& stage, const PipelineCallbacks& cb,
                         const dist::ProcessGroup& group) {
  return sample_with(config, data, weights, out_dir, stage, cb, group, detail::lazy_selection_space(config, data, cb));
}

namespace {

// One evaluation of the pipeline: its cache file and signature, and the cached result if valid.
struct EvalJob {
  std::string name, path;
  json sig;
  EvalOptions options;
  std::optional<EvalResult> cached;
};

EvalJob eval_job(const DistillConfig& config, const LabeledImages& train, const LabeledImages& test,
                 const std::string& name) {
  if (!test.images.defined() || test.images.numel() == 0)
    throw Error("evaluate: no test set (set data.test_root for image folders)");
  const auto& e = config.evaluate;
  EvalJob job;
  job.name = name;
  job.options = detail::eval_options_of(config, name == "full");
  job.sig = {{"protocol", e.protocol}, {"repeats", e.repeats}, {"seed", e.seed}, {"epochs", job.options.epochs()},
             {"image_size", e.image_size}, {"train", dataset_fingerprint(train)}, {"test", dataset_fingerprint(test)}};
  job.path = (fs::path(config.output_dir) / "eval" / (name + ".json")).string();
  const std::string cached = read_cache_text(job.path);
  if (!cached.empty()) {
    try {
      json j = json::parse(cached);
      if (j.at("signature") == job.sig) job.cached = eval_from_json(j.at("result"));
    } catch (const std::exception&) {
      // unreadable cache: evaluate again
    }
  }
  return job;
}

// Where the evaluations keep their finished repeats (`evaluate_sets`): an interrupted evaluation
// stage resumes from them, like the training stages resume from their checkpoints.
std::string repeat_dir_of(const DistillConfig& config) {
  return (fs::path(config.output_dir) / "eval" / "repeats").string();
}

void store_eval(const EvalJob& job, const EvalResult& r, const PipelineCallbacks& cb, const dist::ProcessGroup& group) {
  on_main(group, "evaluate-" + job.name + ": writing " + job.path, [&] {
    write_text_file_atomic(job.path, json({{"signature", job.sig}, {"result", eval_json(r)}}).dump(2) + "\n");
  });
  say(cb, fmt::format("evaluate-{}: {:.2f} +- {:.2f} ({:.0f} s)", job.name, r.mean, r.std, r.seconds));
}

// Several ranks: all sets' repeats form one pool (`evaluate_sets`), so the ranks stay busy even when
// a set's repeats do not divide among them. Results are stored only when the whole pool is done.
std::map<std::string, EvalResult> evaluate_pool(const DistillConfig& config,
                                                const std::vector<std::pair<std::string, const LabeledImages*>>& sets,
                                                const LabeledImages& test, const PipelineCallbacks& cb,
                                                const dist::ProcessGroup& group) {
  std::map<std::string, EvalResult> out;
  std::vector<EvalJob> todo;
  std::vector<EvalSet> todo_sets;
  for (const auto& [name, set] : sets) {
    EvalJob job = eval_job(config, *set, test, name);
    if (job.cached) {
      say(cb, "evaluate-" + name + ": reusing " + job.path);
      out[name] = *job.cached;
    } else {
      todo_sets.push_back(EvalSet{set, job.options, "evaluate-" + name});
      todo.push_back(std::move(job));
    }
  }
  if (todo.empty()) return out;
  say(cb, fmt::format("evaluate: {} sets x {} repeats shared by {} processes", todo.size(), config.evaluate.repeats,
                      group.world_size()));
  const std::vector<EvalResult> results = evaluate_sets(todo_sets, test, group, cb.progress, repeat_dir_of(config));
  for (size_t k = 0; k < todo.size(); ++k) {
    if (results[k].reused > 0)
      say(cb, fmt::format("evaluate-{}: {} of {} repeats reused from {}", todo[k].name, results[k].reused,
                          results[k].best.size(), repeat_dir_of(config)));
    store_eval(todo[k], results[k], cb, group);
    out[todo[k].name] = results[k];
  }
  return out;
}

}  // namespace

EvalResult run_evaluate(const DistillConfig& config, const LabeledImages& train, const LabeledImages& test,
                        const std::string& name, const PipelineCallbacks& cb, const dist::ProcessGroup& group) {
  const EvalJob job = eval_job(config, train, test, name);
  if (job.cached) {
    say(cb, "evaluate-" + name + ": reusing " + job.path);
    return *job.cached;
  }
  const auto& e = config.evaluate;
  say(cb, fmt::format("evaluate-{}: {} images, protocol {}, {} repeats", name, train.images.size(0), e.protocol, e.repeats));
  // Repeats shared by the ranks; each finished one is kept, so a cut-short evaluation resumes.
  EvalResult r =
      evaluate_sets({EvalSet{&train, job.options, "evaluate-" + name}}, test, group, staged(cb, "evaluate-" + name),
                    repeat_dir_of(config))
          .front();
  if (r.reused > 0) say(cb, fmt::format("evaluate-{}: {} of {} repeats reused from {}", name, r.reused, r.best.size(), repeat_dir_of(config)));
  store_eval(job, r, cb, group);
  return r;
}

std::string train_vae(const DistillConfig& config, const PipelineData& data, const PipelineCallbacks& callbacks,
                      const dist::ProcessGroup& group) {
  validate_config(config);
  if (parse_codec_kind(config.codec.kind) != CodecKind::kVae) throw Error("train_vae: config 'codec.kind' must be \"vae\"");
  return run_train_vae(config, data, callbacks, group);
}

std::string run_distill(const DistillConfig& config_in, const DistillRunOptions& options, const PipelineCallbacks& cb) {
  validate_config(config_in);
  DistillConfig config = config_in;
  const auto t_all = clock_type::now();
  const fs::path out(config.output_dir);
  dist::ProcessGroup group = options.process_group;
  // Every rank must run the same pipeline (the trainers check their own settings again).
  group.check_same("resolved config", config_to_json(config));
  on_main(group, "writing " + (out / "config.json").string(), [&] {
    fs::create_directories(out);
    write_text_file_atomic((out / "config.json").string(), config_to_json(config) + "\n");
  });
  json timings = json::object();
  auto timed = [&](const std::string& key, auto&& fn) {
    const auto t0 = clock_type::now();
    auto r = fn();
    timings[key] = std::round(seconds_since(t0) * 10) / 10;
    return r;
  };
  PipelineData data = timed("load_data", [&] { return load_pipeline_data(config, cb); });
  // A codec trained by this run replaces the named one, and the DiT must then learn its latents.
  const bool vae_trained = trains_vae(config, options.force_pretrain);
  if (vae_trained) {
    const std::string folder = timed("train_vae", [&] { return run_train_vae(config, data, cb, group); });
    config.codec.encoder = folder;
    config.codec.decoder = "";
    on_main(group, "writing " + (out / "config.json").string(),
            [&] { write_text_file_atomic((out / "config.json").string(), config_to_json(config) + "\n"); });
  }
  // Built once; the pre-training and fine-tuning stages below share it.
  auto train_data = timed("latents", [&] { return make_training_data(config, data, cb, group); });
  const auto& methods = config.evaluate.methods;
  auto wants = [&](DistillMethod m) {
    return std::any_of(methods.begin(), methods.end(), [&](const std::string& s) { return parse_distill_method(s) == m; });
  };

  std::string base = config.model.checkpoint;
  if (base.empty() || options.force_pretrain || vae_trained) {
    if (!base.empty() && !options.force_pretrain)
      say(cb, "model: not using " + base + ": it was trained on another codec's latents; pre-training on the new VAE's");
    base = timed("pretrain", [&] { return pretrain_with(config, [&] { return train_data; }, options.force_pretrain, cb, group); });
  } else {
    say(cb, "model: pre-trained weights " + base);
  }
  std::map<std::string, std::string> weights;
  if (wants(DistillMethod::kDit)) weights["dit"] = base;
  for (const DistillMethod m : {DistillMethod::kDifffit, DistillMethod::kMinimax})
    if (const std::string v = distill_method_name(m); wants(m))
      weights[v] = timed("finetune_" + v, [&] { return finetune_with(config, [&] { return train_data; }, base, v, cb, group); });

  std::map<std::string, LabeledImages> sets;
  // One feature network for the candidate selection of every method (trained when first needed).
  const auto selection_space = detail::lazy_selection_space(config, data, cb);
  for (const auto& kv : weights) {
    const std::string dir = (out / (kv.first == "minimax" ? "samples" : "samples-" + kv.first)).string();
    sets[kv.first] = timed("sample_" + kv.first, [&] {
      return sample_with(config, data, kv.second, dir, "sample-" + kv.first, cb, group, selection_space);
    });
  }
  const int64_t ipc = config.sample.ipc;
  const torch::Tensor random_idx = select_random(data.train.labels, ipc, config.evaluate.seed);
  sets["random"] = subset(data.train, random_idx);

  on_main(group, "writing the contact sheet", [&] {
    say(cb, detail::write_contact_sheet((out / "contact_sheet.png").string(), sets, int64_t(data.class_dirs.size()), ipc));
  });

  detail::RunSummary run;
  if (!options.skip_evaluate && group.world_size() > 1) {
    // One pool of (set, repeat) jobs for all ranks; the timing is that of the whole pool.
    std::vector<std::pair<std::string, const LabeledImages*>> todo;
    for (const auto& m : methods)
      if (sets.count(m)) todo.emplace_back(m, &sets[m]);
    auto results = timed("evaluate", [&] { return evaluate_pool(config, todo, data.test, cb, group); });
    for (const auto& kv : results) run.results[kv.first] = eval_json(kv.second);
  } else if (!options.skip_evaluate) {
    for (const auto& m : methods) {
      if (!sets.count(m)) continue;
      EvalResult r = timed("evaluate_" + m, [&] { return run_evaluate(config, sets[m], data.test, m, cb, group); });
      run.results[m] = eval_json(r);
    }
  }
  // The whole-set number: computed when asked for, otherwise reported if an earlier run cached it.
  if (!options.skip_evaluate && config.evaluate.full_set) {
    EvalResult r = timed("evaluate_full", [&] { return run_evaluate(config, data.train, data.test, "full", cb, group); });
    run.full = eval_json(r);
    run.full["epochs"] = config.evaluate.full_set_epochs;
  } else {
    run.full = detail::cached_full_set((out / "eval" / "full.json").string());
  }
  timings["total"] = std::round(seconds_since(t_all) * 10) / 10;
  run.timings = timings;
  run.train_images = data.train.images.defined() ? data.train.images.size(0) : 0;
  run.test_images = data.test.images.defined() ? data.test.images.size(0) : 0;
  std::string report_path = (out / "report.json").string();
  on_main(group, "writing the report", [&] { report_path = detail::write_report(out, config, run); });
  say(cb, "report: " + report_path);
  return report_path;
}

}  // namespace mdd
