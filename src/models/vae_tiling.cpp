#include "models/vae_tiling.h"

#include <algorithm>
#include <vector>

#include <torch/torch.h>

namespace mdd::vae::detail {

void blend(const torch::Tensor& a, torch::Tensor& b, int64_t extent, int64_t dim) {
  extent = std::min({a.size(dim), b.size(dim), extent});
  if (extent <= 0) return;
  // Weights in double, then cast, as Python computes y / extent before multiplying a float tensor.
  std::vector<int64_t> shape(4, 1);
  shape[dim] = extent;
  torch::Tensor w = (torch::arange(extent, torch::kFloat64) / static_cast<double>(extent)).view(shape);
  torch::Tensor one_minus_w = (1.0 - w).to(b.options());
  w = w.to(b.options());
  torch::Tensor b_head = b.narrow(dim, 0, extent);
  b_head.copy_(a.narrow(dim, a.size(dim) - extent, extent) * one_minus_w + b_head * w);
}

torch::Tensor tiled_apply(const torch::Tensor& x, int64_t tile, int64_t stride, int64_t blend_extent,
                          int64_t row_limit, const TensorFn& fn) {
  const int64_t H = x.size(2), W = x.size(3);
  std::vector<std::vector<torch::Tensor>> rows;
  for (int64_t i = 0; i < H; i += stride) {
    std::vector<torch::Tensor> row;
    for (int64_t j = 0; j < W; j += stride)
      row.push_back(fn(x.narrow(2, i, std::min(tile, H - i)).narrow(3, j, std::min(tile, W - j))).contiguous());
    rows.push_back(std::move(row));
  }
  std::vector<torch::Tensor> out_rows;
  for (size_t i = 0; i < rows.size(); ++i) {
    std::vector<torch::Tensor> out_row;
    for (size_t j = 0; j < rows[i].size(); ++j) {
      torch::Tensor& t = rows[i][j];
      if (i > 0) blend(rows[i - 1][j], t, blend_extent, 2);
      if (j > 0) blend(rows[i][j - 1], t, blend_extent, 3);
      out_row.push_back(t.narrow(2, 0, std::min(row_limit, t.size(2))).narrow(3, 0, std::min(row_limit, t.size(3))));
    }
    out_rows.push_back(torch::cat(out_row, 3));
  }
  // Tiles of a finished row are no longer needed once the next row has blended against them, but
  // keeping them is at most ~(tile/stride)^2 x the output size: small next to one tile's activations.
  return torch::cat(out_rows, 2);
}

torch::Tensor sliced(const torch::Tensor& x, int64_t slice,
                     const TensorFn& fn) {
  const int64_t n = x.size(0);
  if (slice <= 0 || n <= slice) return fn(x);
  std::vector<torch::Tensor> parts;
  for (int64_t i = 0; i < n; i += slice) parts.push_back(fn(x.narrow(0, i, std::min(slice, n - i))));
  return torch::cat(parts, 0);
}

}  // namespace mdd::vae::detail
