#include "mdd/data/latent_cache.h"

#include <sys/stat.h>

#include <chrono>
#include <cstring>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "mdd/io/image.h"
#include "mdd/io/safetensors.h"
#include "mdd/util/error.h"
#include "util/shape_str.h"

namespace mdd {
namespace {

constexpr const char* kFormat = "mdd.latent_cache.v1";

bool file_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// Word-wise multiply-xor hash (FNV-1a style over 64-bit words): fast enough to fingerprint GBs of
// pixels in seconds, and any changed byte changes the result with overwhelming probability.
void hash_bytes(uint64_t& h, const uint8_t* p, size_t n) {
  constexpr uint64_t kPrime = 0x100000001B3ull;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * kPrime;
    h ^= h >> 29;
  }
  for (; i < n; ++i) h = (h ^ p[i]) * kPrime;
}

void validate(const LabeledImages& data) {
  if (!data.images.defined() || data.images.scalar_type() != torch::kUInt8 || data.images.dim() != 4)
    throw Error(fmt::format("LatentCache: images must be uint8 [N, H, W, C], got {}",
                            data.images.defined() ? shape_str(data.images.sizes()) : "undefined"));
  if (!data.labels.defined() || data.labels.dim() != 1 || data.labels.size(0) != data.images.size(0))
    throw Error(fmt::format("LatentCache: labels must be [{}], got {}", data.images.size(0),
                            data.labels.defined() ? shape_str(data.labels.sizes()) : "undefined"));
}

}  // namespace

std::string dataset_fingerprint(const LabeledImages& data) {
  validate(data);
  uint64_t h = 0xCBF29CE484222325ull;
  const torch::Tensor imgs = data.images.to(torch::kCPU).contiguous();
  const torch::Tensor labels = data.labels.to(torch::kCPU, torch::kInt64).contiguous();
  for (int64_t s : imgs.sizes()) hash_bytes(h, reinterpret_cast<const uint8_t*>(&s), sizeof(s));
  hash_bytes(h, imgs.data_ptr<uint8_t>(), size_t(imgs.numel()));
  hash_bytes(h, reinterpret_cast<const uint8_t*>(labels.data_ptr<int64_t>()), size_t(labels.numel()) * 8);
  return fmt::format("{:016x}", h);
}

LatentCache LatentCache::load(const std::string& path) {
  const io::SafeTensors st = io::load_safetensors(path);
  auto meta = [&](const char* key) -> std::string {
    const auto it = st.metadata.find(key);
    if (it == st.metadata.end()) throw Error(fmt::format("{}: not a latent cache (metadata '{}' missing)", path, key));
    return it->second;
  };
  if (meta("format") != kFormat) throw Error(fmt::format("{}: unknown latent cache format '{}'", path, meta("format")));
  auto get = [&](const char* key) {
    const auto it = st.tensors.find(key);
    if (it == st.tensors.end()) throw Error(fmt::format("{}: latent cache lacks tensor '{}'", path, key));
    return it->second;
  };
  LatentCache c;
  c.mean_ = get("mean");
  c.logvar_ = get("logvar");
  c.labels_ = get("labels");
  if (c.mean_.scalar_type() != torch::kFloat32 || c.mean_.dim() != 5 || c.logvar_.sizes() != c.mean_.sizes() ||
      c.logvar_.scalar_type() != torch::kFloat32 || c.labels_.scalar_type() != torch::kInt64 || c.labels_.dim() != 1 ||
      c.labels_.size(0) != c.mean_.size(0) || c.mean_.size(1) < 1 || c.mean_.size(1) > 2)
    throw Error(fmt::format("{}: inconsistent latent cache tensors (mean {}, logvar {}, labels {})", path,
                            shape_str(c.mean_.sizes()), shape_str(c.logvar_.sizes()), shape_str(c.labels_.sizes())));
  try {
    c.scaling_factor_ = std::stod(meta("scaling_factor"));
  } catch (const std::logic_error&) {
    throw Error(fmt::format("{}: bad scaling_factor '{}'", path, meta("scaling_factor")));
  }
  return c;
}

LatentCache LatentCache::build(const std::string& path, Codec& codec, const LabeledImages& data,
                               const LatentCacheOptions& options, const ProgressFn& progress) {
  validate(data);
  if (options.batch_size() <= 0) throw Error(fmt::format("LatentCache: batch_size must be positive, got {}", options.batch_size()));
  const int64_t n = data.images.size(0), h = data.images.size(1), w = data.images.size(2), ch = data.images.size(3);
  const std::vector<int64_t> lshape = codec.latent_shape({ch, h, w});
  const int64_t views = options.flip() ? 2 : 1;
  const std::string fingerprint = dataset_fingerprint(data);
  const std::string scaling = fmt::format("{:.17g}", codec.scaling_factor());

  if (file_exists(path)) {
    try {
      io::SafeTensors st = io::load_safetensors(path);
      auto meta = [&](const char* k) {
        const auto it = st.metadata.find(k);
        return it == st.metadata.end() ? std::string("\x01missing") : it->second;
      };
      std::vector<int64_t> expect{n, views};
      expect.insert(expect.end(), lshape.begin(), lshape.end());
      if (meta("format") == kFormat && meta("fingerprint") == fingerprint && meta("scaling_factor") == scaling &&
          meta("codec_tag") == options.codec_tag() && meta("views") == std::to_string(views)) {
        LatentCache c = load(path);
        if (c.mean_.sizes() == c10::IntArrayRef(expect) && torch::equal(c.labels_, data.labels.to(torch::kCPU, torch::kInt64))) {
          c.loaded_from_disk_ = true;
          return c;
        }
      }
    } catch (const Error&) {
      // Unreadable or foreign file: fall through and rebuild it (the write below is atomic).
    }
  }

  std::vector<int64_t> full{n, views};
  full.insert(full.end(), lshape.begin(), lshape.end());
  LatentCache c;
  c.mean_ = torch::empty(full, torch::kFloat32);
  c.logvar_ = torch::empty(full, torch::kFloat32);
  c.labels_ = data.labels.to(torch::kCPU, torch::kInt64).contiguous().clone();
  c.scaling_factor_ = codec.scaling_factor();
  const auto t0 = std::chrono::steady_clock::now();
  torch::NoGradGuard no_grad;
  for (int64_t s = 0; s < n; s += options.batch_size()) {
    const int64_t b = std::min(options.batch_size(), n - s);
    // ToTensor + Normalize(0.5, 0.5): exactly the reference's float input in [-1, 1].
    torch::Tensor x = normalize(to_tensor(data.images.narrow(0, s, b).to(torch::kCPU)), {0.5}, {0.5});
    x = x.to(options.device());
    for (int64_t v = 0; v < views; ++v) {
      const torch::Tensor xv = v == 0 ? x : x.flip({3});  // view 1 = horizontal mirror
      const DiagonalGaussian g = codec.encode(xv);
      const torch::Tensor m = g.mean.detach().to(torch::kCPU, torch::kFloat32);
      const torch::Tensor lv = g.logvar.detach().to(torch::kCPU, torch::kFloat32).clamp(-30.0, 20.0);
      std::vector<int64_t> want{b};
      want.insert(want.end(), lshape.begin(), lshape.end());
      if (m.sizes() != c10::IntArrayRef(want) || lv.sizes() != c10::IntArrayRef(want))
        throw Error(fmt::format("LatentCache: codec returned mean {} / logvar {}, expected {} (latent_shape)",
                                shape_str(m.sizes()), shape_str(lv.sizes()), shape_str(want)));
      if (!torch::isfinite(m).all().item<bool>() || !torch::isfinite(lv).all().item<bool>())
        throw Error(fmt::format("LatentCache: non-finite posterior for images [{}, {})", s, s + b));
      c.mean_.narrow(0, s, b).select(1, v).copy_(m);
      c.logvar_.narrow(0, s, b).select(1, v).copy_(lv);
    }
    if (progress)
      progress({"encode_latents", s + b, n, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()});
  }
  io::save_safetensors(path, {{"mean", c.mean_}, {"logvar", c.logvar_}, {"labels", c.labels_}},
                       {{"format", kFormat},
                        {"fingerprint", fingerprint},
                        {"scaling_factor", scaling},
                        {"codec_tag", options.codec_tag()},
                        {"views", std::to_string(views)},
                        {"image_shape", shape_str({ch, h, w})},
                        {"num_images", std::to_string(n)}});
  return c;
}

torch::Tensor LatentCache::sample(const torch::Tensor& indices, torch::Generator& generator) const {
  if (!mean_.defined()) throw Error("LatentCache::sample: empty cache");
  if (!indices.defined() || indices.dim() != 1 || indices.scalar_type() != torch::kInt64)
    throw Error("LatentCache::sample: indices must be int64 [B]");
  const torch::Tensor idx = indices.to(torch::kCPU);
  const int64_t b = idx.size(0);
  if (b > 0 && (idx.min().item<int64_t>() < 0 || idx.max().item<int64_t>() >= size()))
    throw Error(fmt::format("LatentCache::sample: index out of range [0, {})", size()));
  torch::Tensor view = torch::zeros({b}, torch::kInt64);
  if (num_views() == 2) view = (torch::rand({b}, generator) < 0.5).to(torch::kInt64);  // RandomHorizontalFlip(0.5)
  const torch::Tensor rows = torch::arange(b, torch::kInt64);
  const torch::Tensor m = mean_.index_select(0, idx).index({rows, view});
  const torch::Tensor lv = logvar_.index_select(0, idx).index({rows, view});
  const torch::Tensor eps = torch::randn(m.sizes(), generator, torch::kFloat32);
  return (m + torch::exp(0.5 * lv) * eps) * scaling_factor_;
}

}  // namespace mdd
