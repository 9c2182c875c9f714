#include "mdd/eval/augment.h"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/nn/functional/upsampling.h>
#include <torch/torch.h>

#include "mdd/io/image.h"
#include "mdd/util/error.h"

namespace mdd {
namespace {

namespace F = torch::nn::functional;

void check_batch(const torch::Tensor& x, const char* what) {
  if (!x.defined() || x.dim() != 4 || !x.is_floating_point()) {
    throw Error(fmt::format("{}: expected a float batch [N, C, H, W], got {}", what,
                            x.defined() ? fmt::format("{} {}", x.sizes().vec(), std::string(x.dtype().name())) : "undefined"));
  }
}

double uniform(torch::Generator& gen, double lo, double hi) {
  return torch::empty({1}, torch::kFloat64).uniform_(lo, hi, gen).item<double>();
}

int64_t randint(torch::Generator& gen, int64_t hi) {  // [0, hi)
  return torch::randint(hi, {1}, gen, torch::kLong).item<int64_t>();
}

torch::Tensor grey(const torch::Tensor& img) {  // [C,H,W] -> [1,H,W]
  if (img.size(0) == 3) return (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).unsqueeze(0);
  return img.mean(0, true);
}

torch::Tensor resize_bilinear(const torch::Tensor& x, int64_t h, int64_t w, bool antialias) {
  auto o = F::InterpolateFuncOptions().size(std::vector<int64_t>{h, w}).mode(torch::kBilinear).align_corners(false);
  o.antialias(antialias);
  return F::interpolate(x, o);
}

}  // namespace

torch::Tensor random_resized_crop(const torch::Tensor& images, int64_t size, torch::Generator generator,
                                  std::array<double, 2> scale, std::array<double, 2> ratio) {
  check_batch(images, "random_resized_crop");
  if (size < 1) throw Error(fmt::format("random_resized_crop: bad size {}", size));
  const int64_t n = images.size(0), height = images.size(2), width = images.size(3);
  const double area = static_cast<double>(height * width);
  const double log_r0 = std::log(ratio[0]), log_r1 = std::log(ratio[1]);
  std::vector<torch::Tensor> out;
  out.reserve(n);
  for (int64_t k = 0; k < n; ++k) {
    int64_t i = 0, j = 0, h = height, w = width;
    bool found = false;
    for (int attempt = 0; attempt < 10 && !found; ++attempt) {
      const double target = area * uniform(generator, scale[0], scale[1]);
      const double aspect = std::exp(uniform(generator, log_r0, log_r1));
      const int64_t cw = std::llround(std::sqrt(target * aspect));
      const int64_t ch = std::llround(std::sqrt(target / aspect));
      if (cw > 0 && cw <= width && ch > 0 && ch <= height) {
        i = randint(generator, height - ch + 1);
        j = randint(generator, width - cw + 1);
        h = ch;
        w = cw;
        found = true;
      }
    }
    if (!found) {  // torchvision's fallback: centre crop with the ratio clamped into range
      const double in_ratio = static_cast<double>(width) / height;
      if (in_ratio < ratio[0]) {
        w = width;
        h = std::llround(w / ratio[0]);
      } else if (in_ratio > ratio[1]) {
        h = height;
        w = std::llround(h * ratio[1]);
      } else {
        w = width;
        h = height;
      }
      i = (height - h) / 2;
      j = (width - w) / 2;
    }
    auto crop = images.slice(0, k, k + 1).slice(2, i, i + h).slice(3, j, j + w);
    out.push_back(resize_bilinear(crop, size, size, false));
  }
  return torch::cat(out, 0);
}

torch::Tensor random_horizontal_flip(const torch::Tensor& images, torch::Generator generator, double p) {
  check_batch(images, "random_horizontal_flip");
  auto mask = (torch::rand({images.size(0)}, generator) < p).to(images.device()).view({-1, 1, 1, 1});
  return torch::where(mask, images.flip({3}), images);
}

torch::Tensor color_jitter(const torch::Tensor& images, torch::Generator generator, double brightness,
                           double contrast, double saturation) {
  check_batch(images, "color_jitter");
  const int64_t n = images.size(0);
  std::vector<torch::Tensor> out;
  out.reserve(n);
  for (int64_t k = 0; k < n; ++k) {
    auto img = images[k];
    // The reference shuffles the list of enabled ops per image, then draws each alpha when applied.
    std::vector<int> ops;
    if (brightness != 0) ops.push_back(0);
    if (contrast != 0) ops.push_back(1);
    if (saturation != 0) ops.push_back(2);
    auto perm = torch::randperm(static_cast<int64_t>(ops.size()), generator, torch::kLong);
    for (int64_t q = 0; q < perm.size(0); ++q) {
      const int op = ops[perm[q].item<int64_t>()];
      if (op == 0) {
        const double a = uniform(generator, -brightness, brightness);
        img = img * (1.0 - a);  // lerp towards black
      } else if (op == 1) {
        const double a = uniform(generator, -contrast, contrast);
        img = img + a * (grey(img).mean() - img);  // lerp towards the mean grey level
      } else {
        const double a = uniform(generator, -saturation, saturation);
        img = img + a * (grey(img) - img);  // lerp towards the grey image
      }
    }
    out.push_back(img);
  }
  return torch::stack(out, 0);
}

torch::Tensor lighting(const torch::Tensor& images, torch::Generator generator, double alphastd) {
  check_batch(images, "lighting");
  if (images.size(1) != 3) throw Error(fmt::format("lighting: needs 3 channels, got {}", images.size(1)));
  if (alphastd == 0) return images;
  // ImageNet PCA of RGB pixels (IDC data.py:319-325).
  static const float eigval_d[3] = {0.2175f, 0.0188f, 0.0045f};
  static const float eigvec_d[9] = {-0.5675f, 0.7192f, 0.4009f, -0.5808f, -0.0045f, -0.8140f,
                                    -0.5836f, -0.6948f, 0.4203f};
  auto eigval = torch::from_blob(const_cast<float*>(eigval_d), {1, 3}).clone();
  auto eigvec = torch::from_blob(const_cast<float*>(eigvec_d), {3, 3}).clone();
  auto alpha = torch::empty({images.size(0), 3}).normal_(0.0, alphastd, generator);
  // rgb[n, c] = sum_k eigvec[c, k] * alpha[n, k] * eigval[k]
  auto rgb = torch::matmul(alpha * eigval, eigvec.t());
  return images + rgb.to(images.device(), images.scalar_type()).view({-1, 3, 1, 1});
}

torch::Tensor normalize_batch(const torch::Tensor& images, const std::vector<double>& mean, const std::vector<double>& std) {
  check_batch(images, "normalize_batch");
  const int64_t c = images.size(1);
  if (static_cast<int64_t>(mean.size()) != c || static_cast<int64_t>(std.size()) != c) {
    throw Error(fmt::format("normalize_batch: {} channels but mean/std have {}/{} entries", c, mean.size(), std.size()));
  }
  // The arithmetic is io/image.h's normalize (torchvision's sub-then-div); only the stricter
  // per-channel check is specific to batches.
  return normalize(images, mean, std);
}

CutMixBatch cutmix(const torch::Tensor& images, const torch::Tensor& labels, torch::Generator generator,
                   double beta) {
  check_batch(images, "cutmix");
  if (labels.dim() != 1 || labels.size(0) != images.size(0)) {
    throw Error(fmt::format("cutmix: labels {} do not match images {}", labels.sizes().vec(), images.sizes().vec()));
  }
  if (!(beta > 0)) throw Error(fmt::format("cutmix: beta must be > 0, got {}", beta));
  CutMixBatch r;
  // Beta(b, b) from two Gamma(b) draws.
  auto g = at::_standard_gamma(torch::full({2}, beta, torch::kFloat64), generator);
  const double g0 = g[0].item<double>(), g1 = g[1].item<double>();
  r.lambda = (g0 + g1) > 0 ? g0 / (g0 + g1) : 0.5;
  auto perm = torch::randperm(images.size(0), generator, torch::kLong).to(images.device());
  // Reference naming: W = size[2], H = size[3].
  const int64_t W = images.size(2), H = images.size(3);
  const double cut = std::sqrt(1.0 - r.lambda);
  const int64_t cut_w = static_cast<int64_t>(W * cut), cut_h = static_cast<int64_t>(H * cut);
  const int64_t cx = randint(generator, W), cy = randint(generator, H);
  r.x1 = std::clamp<int64_t>(cx - cut_w / 2, 0, W);
  r.y1 = std::clamp<int64_t>(cy - cut_h / 2, 0, H);
  r.x2 = std::clamp<int64_t>(cx + cut_w / 2, 0, W);
  r.y2 = std::clamp<int64_t>(cy + cut_h / 2, 0, H);
  r.images = images.clone();
  if (r.x2 > r.x1 && r.y2 > r.y1) {
    auto patch = images.index_select(0, perm).slice(2, r.x1, r.x2).slice(3, r.y1, r.y2);
    r.images.slice(2, r.x1, r.x2).slice(3, r.y1, r.y2).copy_(patch);
  }
  r.labels_a = labels;
  r.labels_b = labels.index_select(0, perm.to(labels.device()));
  r.ratio = 1.0 - static_cast<double>((r.x2 - r.x1) * (r.y2 - r.y1)) / static_cast<double>(W * H);
  return r;
}

torch::Tensor resize_center_crop(const torch::Tensor& images, int64_t size) {
  check_batch(images, "resize_center_crop");
  const int64_t h = images.size(2), w = images.size(3);
  if (h == size && w == size) return images;
  // torchvision Resize(int): shorter side -> size, longer side int(size * long / short).
  int64_t nh = size, nw = size;
  if (h < w) nw = static_cast<int64_t>(static_cast<double>(size) * w / h);
  if (w < h) nh = static_cast<int64_t>(static_cast<double>(size) * h / w);
  auto x = resize_bilinear(images, nh, nw, true);
  const int64_t top = static_cast<int64_t>(std::nearbyint((nh - size) / 2.0));
  const int64_t left = static_cast<int64_t>(std::nearbyint((nw - size) / 2.0));
  return x.slice(2, top, top + size).slice(3, left, left + size).contiguous();
}

torch::Tensor idc_train_transform(const torch::Tensor& images, int64_t size, const std::vector<double>& mean,
                                  const std::vector<double>& std, torch::Generator generator) {
  auto x = random_resized_crop(images, size, generator);
  x = random_horizontal_flip(x, generator);
  x = color_jitter(x, generator);
  if (x.size(1) == 3) x = lighting(x, generator);
  return normalize_batch(x, mean, std);
}

torch::Tensor test_transform(const torch::Tensor& images, int64_t size, const std::vector<double>& mean,
                             const std::vector<double>& std) {
  return normalize_batch(resize_center_crop(images, size), mean, std);
}

}  // namespace mdd
