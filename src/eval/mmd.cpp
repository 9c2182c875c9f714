#include "mdd/eval/mmd.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <torch/torch.h>

#include "mdd/util/error.h"

namespace mdd {
namespace {

torch::Tensor as_matrix(const torch::Tensor& t, const char* name) {
  if (!t.defined() || t.dim() != 2 || t.size(0) < 2) {
    throw Error(fmt::format("mmd: {} must be [n >= 2, D], got {}", name, t.defined() ? t.sizes().vec() : std::vector<int64_t>{}));
  }
  auto m = t.detach().cpu().to(torch::kFloat64);
  if (!torch::isfinite(m).all().item<bool>()) throw Error(fmt::format("mmd: {} contains NaN/Inf", name));
  return m;
}

torch::Tensor sq_dist(const torch::Tensor& a, const torch::Tensor& b) {
  auto d = a.pow(2).sum(1, true) + b.pow(2).sum(1).unsqueeze(0) - 2.0 * torch::matmul(a, b.t());
  return d.clamp_min(0.0);
}

}  // namespace

double median_bandwidth(const torch::Tensor& x, const torch::Tensor& y) {
  auto z = torch::cat({as_matrix(x, "x"), as_matrix(y, "y")});
  auto d = sq_dist(z, z);
  const int64_t n = z.size(0);
  auto mask = torch::ones({n, n}, torch::kBool).triu(1);
  auto pairs = d.masked_select(mask).sqrt();
  // torch::median returns the lower of the two middle values; average them for an even count.
  auto sorted = std::get<0>(pairs.sort());
  const int64_t m = sorted.numel();
  const double med = m % 2 ? sorted[m / 2].item<double>()
                           : 0.5 * (sorted[m / 2 - 1].item<double>() + sorted[m / 2].item<double>());
  return med > 0 ? med : 1.0;  // all points identical: any bandwidth gives MMD 0
}

double mmd2(const torch::Tensor& x, const torch::Tensor& y, const MMDOptions& options) {
  auto a = as_matrix(x, "x"), b = as_matrix(y, "y");
  if (a.size(1) != b.size(1)) throw Error(fmt::format("mmd: feature sizes differ ({} vs {})", a.size(1), b.size(1)));
  std::vector<double> sigmas = options.bandwidths();
  if (sigmas.empty()) {
    const double med = median_bandwidth(a, b);
    for (double m : options.multipliers()) sigmas.push_back(med * m);
  }
  if (sigmas.empty()) throw Error("mmd: no bandwidth");
  for (double s : sigmas) {
    if (!(s > 0)) throw Error(fmt::format("mmd: bandwidth must be > 0, got {}", s));
  }
  const auto dxx = sq_dist(a, a), dyy = sq_dist(b, b), dxy = sq_dist(a, b);
  auto kernel = [&](const torch::Tensor& d) {
    auto k = torch::zeros_like(d);
    for (double s : sigmas) k += torch::exp(-d / (2.0 * s * s));
    return k;
  };
  const double m = static_cast<double>(a.size(0)), n = static_cast<double>(b.size(0));
  auto kxx = kernel(dxx), kyy = kernel(dyy), kxy = kernel(dxy);
  const double sxx = (kxx.sum() - kxx.diagonal().sum()).item<double>() / (m * (m - 1));
  const double syy = (kyy.sum() - kyy.diagonal().sum()).item<double>() / (n * (n - 1));
  const double sxy = kxy.sum().item<double>() / (m * n);
  return sxx + syy - 2.0 * sxy;
}

}  // namespace mdd
