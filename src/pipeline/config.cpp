#include "mdd/pipeline/config.h"

#include <functional>
#include <map>
#include <set>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "mdd/diffusion/guidance.h"
#include "mdd/diffusion/sampler.h"
#include "mdd/eval/evaluator.h"
#include "mdd/train/vae_trainer.h"
#include "mdd/io/weight_entry.h"
#include "mdd/util/error.h"
#include "mdd/util/precision.h"
#include "pipeline/config_json.h"
#include "pipeline/config_options.h"
#include "util/file_util.h"
#include "util/enum_names.h"
#include "util/json_read.h"

namespace mdd {
namespace {
constexpr detail::EnumNames<DataKind, 2> kDataKinds{{{DataKind::kFashionMnist, "fashion-mnist"},
                                                      {DataKind::kImageFolder, "imagefolder"}}};
constexpr detail::EnumNames<CodecKind, 2> kCodecKinds{{{CodecKind::kIdentity, "identity"}, {CodecKind::kVae, "vae"}}};
constexpr detail::EnumNames<DistillMethod, 4> kMethods{{{DistillMethod::kRandom, "random"},
                                                         {DistillMethod::kDit, "dit"},
                                                         {DistillMethod::kDifffit, "difffit"},
                                                         {DistillMethod::kMinimax, "minimax"}}};
}  // namespace

const char* data_kind_name(DataKind k) { return detail::enum_name(kDataKinds, k); }
DataKind parse_data_kind(const std::string& name) { return detail::parse_enum(kDataKinds, "data kind", name); }
const char* codec_kind_name(CodecKind k) { return detail::enum_name(kCodecKinds, k); }
CodecKind parse_codec_kind(const std::string& name) { return detail::parse_enum(kCodecKinds, "codec kind", name); }
const char* distill_method_name(DistillMethod m) { return detail::enum_name(kMethods, m); }
DistillMethod parse_distill_method(const std::string& name) { return detail::parse_enum(kMethods, "method", name); }
namespace {

using json = nlohmann::json;

struct Field {
  std::function<void(const json&, const std::string& where)> set;
  std::function<json()> get;
};

// A config key bound to the field it sets: reads go through the shared typed JSON readers.
template <class T>
Field bind(T& ref, T (*read)(const json&, const std::string&)) {
  return {[&ref, read](const json& j, const std::string& where) { ref = read(j, where); }, [&ref] { return json(ref); }};
}

Field field(std::string& ref) { return bind(ref, detail::json_string); }
Field field(int64_t& ref) { return bind(ref, detail::json_int); }
Field field(uint64_t& ref) { return bind(ref, detail::json_uint); }
Field field(double& ref) { return bind(ref, detail::json_number); }
Field field(bool& ref) { return bind(ref, detail::json_bool); }
Field field(std::vector<std::string>& ref) { return bind(ref, detail::json_string_list); }
Field field(std::vector<int64_t>& ref) { return bind(ref, detail::json_int_list); }

// Every key of the config, in file order, bound to `c`.
std::vector<std::pair<std::string, Field>> fields(DistillConfig& c) {
  std::vector<std::pair<std::string, Field>> f;
  auto add = [&f](const std::string& k, Field x) { f.emplace_back(k, std::move(x)); };
  add("name", field(c.name));
  add("output_dir", field(c.output_dir));
  add("device", field(c.device));
  add("threads", field(c.threads));
  add("data.kind", field(c.data.kind));
  add("data.root", field(c.data.root));
  add("data.test_root", field(c.data.test_root));
  add("data.spec", field(c.data.spec));
  add("data.nclass", field(c.data.nclass));
  add("data.phase", field(c.data.phase));
  add("data.image_size", field(c.data.image_size));
  add("data.finetune_ipc", field(c.data.finetune_ipc));
  add("data.threads", field(c.data.threads));
  add("codec.kind", field(c.codec.kind));
  add("codec.encoder", field(c.codec.encoder));
  add("codec.decoder", field(c.codec.decoder));
  add("codec.batch_size", field(c.codec.batch_size));
  add("vae.steps", field(c.vae.steps));
  add("vae.batch_size", field(c.vae.batch_size));
  add("vae.lr", field(c.vae.lr));
  add("vae.lr_warmup", field(c.vae.lr_warmup));
  add("vae.kl_weight", field(c.vae.kl_weight));
  add("vae.reconstruction", field(c.vae.reconstruction));
  add("vae.block_out_channels", field(c.vae.block_out_channels));
  add("vae.latent_channels", field(c.vae.latent_channels));
  add("vae.layers_per_block", field(c.vae.layers_per_block));
  add("vae.norm_num_groups", field(c.vae.norm_num_groups));
  add("vae.ckpt_every", field(c.vae.ckpt_every));
  add("vae.seed", field(c.vae.seed));
  add("vae.precision", field(c.vae.precision));
  add("vae.decoder_steps", field(c.vae.decoder_steps));
  add("model.name", field(c.model.name));
  add("model.input_size", field(c.model.input_size));
  add("model.patch_size", field(c.model.patch_size));
  add("model.in_channels", field(c.model.in_channels));
  add("model.hidden_size", field(c.model.hidden_size));
  add("model.depth", field(c.model.depth));
  add("model.num_heads", field(c.model.num_heads));
  add("model.num_classes", field(c.model.num_classes));
  add("model.class_dropout_prob", field(c.model.class_dropout_prob));
  add("model.checkpoint", field(c.model.checkpoint));
  add("pretrain.steps", field(c.pretrain.steps));
  add("pretrain.batch_size", field(c.pretrain.batch_size));
  add("pretrain.lr", field(c.pretrain.lr));
  add("pretrain.ema_decay", field(c.pretrain.ema_decay));
  add("pretrain.ckpt_every", field(c.pretrain.ckpt_every));
  add("pretrain.seed", field(c.pretrain.seed));
  add("pretrain.use_ema", field(c.pretrain.use_ema));
  add("pretrain.ema_warmup", field(c.pretrain.ema_warmup));
  add("pretrain.lr_warmup", field(c.pretrain.lr_warmup));
  add("pretrain.precision", field(c.pretrain.precision));
  add("finetune.steps", field(c.finetune.steps));
  add("finetune.batch_size", field(c.finetune.batch_size));
  add("finetune.lr", field(c.finetune.lr));
  add("finetune.weight_decay", field(c.finetune.weight_decay));
  add("finetune.ema_decay", field(c.finetune.ema_decay));
  add("finetune.gamma_blocks", field(c.finetune.gamma_blocks));
  add("finetune.lambda_r", field(c.finetune.lambda_r));
  add("finetune.lambda_d", field(c.finetune.lambda_d));
  add("finetune.memory_size", field(c.finetune.memory_size));
  add("finetune.ckpt_every", field(c.finetune.ckpt_every));
  add("finetune.seed", field(c.finetune.seed));
  add("finetune.precision", field(c.finetune.precision));
  add("sample.ipc", field(c.sample.ipc));
  add("sample.steps", field(c.sample.steps));
  add("sample.cfg_scale", field(c.sample.cfg_scale));
  add("sample.cfg_interval", field(c.sample.cfg_interval));
  add("sample.eta", field(c.sample.eta));
  add("sample.guidance", field(c.sample.guidance));
  add("sample.method", field(c.sample.method));
  add("sample.batch_size", field(c.sample.batch_size));
  add("sample.seed", field(c.sample.seed));
  add("sample.entry", field(c.sample.entry));
  add("sample.precision", field(c.sample.precision));
  add("sample.candidates", field(c.sample.candidates));
  add("sample.select", field(c.sample.select));
  add("sample.select_epochs", field(c.sample.select_epochs));
  add("sample.select_per_class", field(c.sample.select_per_class));
  add("evaluate.protocol", field(c.evaluate.protocol));
  add("evaluate.repeats", field(c.evaluate.repeats));
  add("evaluate.methods", field(c.evaluate.methods));
  add("evaluate.epochs", field(c.evaluate.epochs));
  add("evaluate.full_set", field(c.evaluate.full_set));
  add("evaluate.full_set_epochs", field(c.evaluate.full_set_epochs));
  add("evaluate.seed", field(c.evaluate.seed));
  add("evaluate.image_size", field(c.evaluate.image_size));
  return f;
}

const std::set<std::string>& sections() {
  static const std::set<std::string> s{"data", "codec", "vae", "model", "pretrain", "finetune", "sample", "evaluate"};
  return s;
}

std::string known_keys(const std::vector<std::pair<std::string, Field>>& f, const std::string& section) {
  std::string out;
  for (const auto& kv : f) {
    const auto dot = kv.first.find('.');
    const std::string sec = dot == std::string::npos ? "" : kv.first.substr(0, dot);
    if (sec != section) continue;
    if (!out.empty()) out += ", ";
    out += dot == std::string::npos ? kv.first : kv.first.substr(dot + 1);
  }
  if (section.empty())
    for (const auto& s : sections()) out += ", " + s;
  return out;
}

void set_key(DistillConfig& c, const std::string& key, const json& value, const std::string& what) {
  auto f = fields(c);
  for (auto& kv : f) {
    if (kv.first == key) {
      kv.second.set(value, fmt::format("{}: '{}'", what, key));
      return;
    }
  }
  const auto dot = key.find('.');
  const std::string sec = dot == std::string::npos ? "" : key.substr(0, dot);
  if (!sec.empty() && !sections().count(sec))
    throw Error(fmt::format("{}: unknown section '{}' (known: {})", what, sec, known_keys(f, "")));
  throw Error(fmt::format("{}: unknown key '{}' (known keys{}: {})", what, key, sec.empty() ? "" : " of '" + sec + "'",
                          known_keys(f, sec)));
}

}  // namespace

DistillConfig parse_config(const std::string& text, const std::string& what) {
  json j;
  try {
    j = json::parse(text);
  } catch (const std::exception& e) {
    throw Error(fmt::format("{}: not valid JSON: {}", what, e.what()));
  }
  if (!j.is_object()) throw Error(what + ": the config must be a JSON object");
  DistillConfig c;
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key().rfind("//", 0) == 0 || it.key() == "comment") continue;  // comments are allowed
    if (sections().count(it.key())) {
      if (!it.value().is_object())
        throw Error(fmt::format("{}: '{}' must be an object of keys", what, it.key()));
      for (auto jt = it.value().begin(); jt != it.value().end(); ++jt) {
        if (jt.key().rfind("//", 0) == 0 || jt.key() == "comment") continue;
        set_key(c, it.key() + "." + jt.key(), jt.value(), what);
      }
    } else {
      set_key(c, it.key(), it.value(), what);
    }
  }
  validate_config(c);
  return c;
}

DistillConfig load_config(const std::string& path) {
  return parse_config(read_text_file(path, uint64_t(16) << 20), path);
}

void apply_override(DistillConfig& config, const std::string& assignment) {
  const auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw Error("override '" + assignment + "': expected section.key=value, e.g. finetune.steps=500");
  const std::string key = assignment.substr(0, eq), raw = assignment.substr(eq + 1);
  json value;
  try {
    value = json::parse(raw);
  } catch (const std::exception&) {
    value = raw;  // bare strings need no quotes on a command line
  }
  DistillConfig copy = config;
  set_key(copy, key, value, "override");
  validate_config(copy);
  config = copy;
}

nlohmann::json detail::config_json(const DistillConfig& config) {
  DistillConfig c = config;
  json j = json::object();
  for (auto& kv : fields(c)) {
    const auto dot = kv.first.find('.');
    if (dot == std::string::npos)
      j[kv.first] = kv.second.get();
    else
      j[kv.first.substr(0, dot)][kv.first.substr(dot + 1)] = kv.second.get();
  }
  return j;
}

std::string config_to_json(const DistillConfig& config) { return detail::config_json(config).dump(2); }

void validate_config(const DistillConfig& c) {
  auto fail = [](const std::string& key, const std::string& msg) { throw Error("config: '" + key + "' " + msg); };
  auto one_of = [&](const std::string& key, const std::string& v, std::initializer_list<const char*> allowed) {
    std::string list;
    for (const char* a : allowed) {
      if (v == a) return;
      list += std::string(list.empty() ? "" : ", ") + a;
    }
    fail(key, "is \"" + v + "\"; expected one of: " + list);
  };
  // Choices that are library enums are checked by the enum's own parser (one list of names).
  auto parses = [&](const std::string& key, const auto& parse) {
    try {
      parse();
    } catch (const Error& e) {
      fail(key, std::string("is invalid: ") + e.what());
    }
  };
  parses("data.kind", [&] { parse_data_kind(c.data.kind); });
  parses("codec.kind", [&] { parse_codec_kind(c.codec.kind); });
  parses("sample.guidance", [&] { parse_cfg_guidance(c.sample.guidance.c_str()); });
  parses("sample.method", [&] { parse_sampling_method(c.sample.method); });
  one_of("sample.entry", c.sample.entry, {"", io::kEmaEntry, io::kModelEntry});
  one_of("sample.select", c.sample.select, {"herding", "kcenter", "random"});
  for (auto [k, v] : {std::pair<const char*, const std::string*>{"pretrain.precision", &c.pretrain.precision},
                      {"finetune.precision", &c.finetune.precision}, {"sample.precision", &c.sample.precision},
                      {"vae.precision", &c.vae.precision}})
    parses(k, [v = v] { parse_precision(*v); });
  for (const auto& m : c.evaluate.methods) parses("evaluate.methods", [&] { parse_distill_method(m); });
  if (c.output_dir.empty()) fail("output_dir", "must not be empty");
  if (c.data.nclass <= 0) fail("data.nclass", "must be > 0");
  if (c.data.phase < 0) fail("data.phase", "must be >= 0");
  if (c.data.image_size <= 0) fail("data.image_size", "must be > 0");
  if (parse_data_kind(c.data.kind) == DataKind::kImageFolder && c.data.root.empty()) fail("data.root", "must name the training image folder");
  if (parse_codec_kind(c.codec.kind) == CodecKind::kVae && c.codec.encoder.empty() && c.codec.decoder.empty() && c.vae.steps == 0)
    fail("codec.encoder", "must name a VAE (diffusers folder or weight file) when codec.kind is \"vae\", "
                          "or set vae.steps to train one");
  // Each section is judged by the rules of the component it configures (one validator per options
  // struct); `in` names the offending config key. Options a section takes from another section
  // (the label dropout of the training runs is model.class_dropout_prob) are renamed to that key.
  auto in = [&](const std::string& section) -> OptionFail {
    return [&fail, section](const std::string& option, const std::string& rule) {
      fail(option == "class_dropout_prob" ? "model." + option : section + "." + option, rule);
    };
  };
  parses("model.name", [&] { detail::dit_options_of(c.model); });
  check_options(detail::dit_options_of(c.model), in("model"));
  check_options(detail::pretrain_options_of(c), in("pretrain"));
  check_options(detail::finetune_options_of(c, /*minimax=*/true), in("finetune"));
  check_options(detail::vae_trainer_options_of(c.vae), in("vae"));
  // The image channels are known only once the data is read; 1 stands in (it cannot break a rule).
  check_options(detail::vae_architecture_of(c.vae, 1, c.data.image_size), in("vae"));
  check_options(detail::sampler_options_of(c, /*learn_sigma=*/true, c.model.num_classes), in("sample"));
  check_options(detail::eval_options_of(c, /*full_set=*/false), in("evaluate"));
  if (parse_codec_kind(c.codec.kind) == CodecKind::kVae && c.vae.steps > 0 && c.vae.latent_channels != c.model.in_channels)
    fail("model.in_channels", fmt::format("is {} but the VAE trained by this run has vae.latent_channels = {}",
                                          c.model.in_channels, c.vae.latent_channels));
  if (c.codec.batch_size <= 0) fail("codec.batch_size", "must be > 0");
  if (c.vae.decoder_steps < 0) fail("vae.decoder_steps", fmt::format("must be >= 0, got {}", c.vae.decoder_steps));
  if (c.vae.decoder_steps > 0 && c.vae.steps <= 0)
    fail("vae.decoder_steps", "needs vae.steps > 0: decoder-only fine-tuning follows the joint training (to tune the "
                              "decoder of an existing VAE use mdd_train_vae --init DIR --decoder-only)");
  // Rules of the pipeline itself (no component owns these keys).
  if (c.sample.candidates < 1 || c.sample.candidates > 1000)
    fail("sample.candidates", fmt::format("must be in [1, 1000] (generated images per kept image), got {}", c.sample.candidates));
  for (auto [k, v] : {std::pair<const char*, int64_t>{"sample.ipc", c.sample.ipc},
                      {"sample.select_epochs", c.sample.select_epochs},
                      {"evaluate.full_set_epochs", c.evaluate.full_set_epochs}})
    if (v <= 0) fail(k, "must be > 0");
  for (auto [k, v] : {std::pair<const char*, int64_t>{"threads", c.threads}, {"data.threads", c.data.threads},
                      {"sample.select_per_class", c.sample.select_per_class}})
    if (v < 0) fail(k, "must be >= 0");
  if (c.model.num_classes < c.data.nclass) fail("model.num_classes", "is smaller than data.nclass");
  if (c.evaluate.methods.empty()) fail("evaluate.methods", "must list at least one method");
}

}  // namespace mdd
