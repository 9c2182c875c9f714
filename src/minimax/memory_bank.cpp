#include "mdd/minimax/memory_bank.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <torch/torch.h>

#include "mdd/util/error.h"
#include "util/shape_str.h"

namespace mdd {

namespace {

}  // namespace

MemoryBank::MemoryBank(int64_t num_classes, int64_t capacity) : num_classes_(num_classes), capacity_(capacity) {
  if (num_classes <= 0 || capacity <= 0) {
    throw Error(fmt::format("MemoryBank: num_classes ({}) and capacity ({}) must be positive", num_classes, capacity));
  }
  rings_.resize(static_cast<size_t>(num_classes));
}

void MemoryBank::check_label(int64_t label, const char* what) const {
  if (label < 0 || label >= num_classes_) {
    throw Error(fmt::format("MemoryBank::{}: label {} out of range [0, {})", what, label, num_classes_));
  }
}

void MemoryBank::push(const torch::Tensor& items, const torch::Tensor& labels) {
  torch::NoGradGuard no_grad;
  if (!items.defined() || !labels.defined()) throw Error("MemoryBank::push: undefined items or labels tensor");
  if (items.dim() < 1) throw Error(fmt::format("MemoryBank::push: items must be [N, ...], got {}", shape_str(items.sizes())));
  if (labels.dim() != 1 || labels.size(0) != items.size(0)) {
    throw Error(fmt::format("MemoryBank::push: labels {} must be [N] with N = items.size(0) = {} (items {})",
                            shape_str(labels.sizes()), items.size(0), shape_str(items.sizes())));
  }
  if (labels.is_floating_point() || labels.is_complex() || labels.scalar_type() == torch::kBool) {
    throw Error(fmt::format("MemoryBank::push: labels must be an integer tensor, got {}", c10::toString(labels.scalar_type())));
  }
  const int64_t n = items.size(0);
  const auto shape = items.sizes().slice(1).vec();
  if (!has_layout_) {
    if (!items.is_floating_point()) {
      throw Error(fmt::format("MemoryBank::push: items must be floating point, got {}", c10::toString(items.scalar_type())));
    }
    item_shape_ = shape;
    item_numel_ = c10::multiply_integers(shape);
    dtype_ = items.scalar_type();
    device_ = items.device();
    has_layout_ = true;
  } else if (shape != item_shape_) {
    throw Error(fmt::format("MemoryBank::push: item shape {} differs from the bank's item shape {}",
                            shape_str(shape), shape_str(item_shape_)));
  }
  if (n == 0) return;

  const auto lab = labels.to(torch::kCPU, torch::kLong).contiguous();
  const int64_t* lp = lab.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) check_label(lp[i], "push");

  auto flat = items.detach().reshape({n, item_numel_}).to(device_, dtype_);
  // Norms in float64: no under/overflow for float32 items and exact enough for the loss's
  // cosines. Checked here so a NaN/Inf never enters the memory silently.
  auto norms = flat.to(torch::kDouble).norm(2, {1});
  if (!torch::isfinite(norms).all().item<bool>()) {
    auto bad = torch::nonzero(torch::logical_not(torch::isfinite(norms))).flatten().to(torch::kCPU);
    throw Error(fmt::format("MemoryBank::push: item {} (label {}) contains NaN or Inf", bad[0].item<int64_t>(),
                            lp[bad[0].item<int64_t>()]));
  }

  // Per class: only the last `capacity` items of this push survive; their destination slots
  // follow the ring. Grouping per class turns the push into one index_copy_ per class.
  std::vector<std::vector<int64_t>> src(static_cast<size_t>(num_classes_));
  for (int64_t i = 0; i < n; ++i) src[static_cast<size_t>(lp[i])].push_back(i);
  for (int64_t c = 0; c < num_classes_; ++c) {
    auto& idx = src[static_cast<size_t>(c)];
    if (idx.empty()) continue;
    Ring& r = rings_[static_cast<size_t>(c)];
    if (!r.data.defined()) {
      r.data = torch::empty({capacity_, item_numel_}, torch::TensorOptions().dtype(dtype_).device(device_));
      r.norms = torch::zeros({capacity_}, torch::TensorOptions().dtype(torch::kDouble).device(device_));
    }
    const int64_t total = static_cast<int64_t>(idx.size());
    const int64_t keep = std::min(total, capacity_);
    const int64_t skipped = total - keep;  // pushed and immediately dropped again
    std::vector<int64_t> keep_src(idx.end() - keep, idx.end());
    std::vector<int64_t> dst(static_cast<size_t>(keep));
    const int64_t start = (r.next + skipped) % capacity_;
    for (int64_t k = 0; k < keep; ++k) dst[static_cast<size_t>(k)] = (start + k) % capacity_;
    auto src_t = torch::tensor(keep_src, torch::kLong).to(device_);
    auto dst_t = torch::tensor(dst, torch::kLong).to(device_);
    r.data.index_copy_(0, dst_t, flat.index_select(0, src_t));
    r.norms.index_copy_(0, dst_t, norms.index_select(0, src_t));
    r.next = (r.next + total) % capacity_;
    r.count = std::min(capacity_, r.count + total);
  }
}

torch::Tensor MemoryBank::get(int64_t label) const {
  check_label(label, "get");
  const Ring& r = rings_[static_cast<size_t>(label)];
  std::vector<int64_t> out_shape{r.count};
  out_shape.insert(out_shape.end(), item_shape_.begin(), item_shape_.end());
  if (r.count == 0) {
    return torch::empty(out_shape, torch::TensorOptions().dtype(dtype_).device(device_));
  }
  const int64_t h = head(label);
  torch::Tensor rows;
  if (h == 0) {
    rows = r.data.narrow(0, 0, r.count).clone();
  } else {  // full ring: oldest part is [head, capacity), then [0, head)
    rows = torch::cat({r.data.narrow(0, h, capacity_ - h), r.data.narrow(0, 0, h)}, 0);
  }
  return rows.reshape(out_shape);
}

int64_t MemoryBank::size(int64_t label) const {
  check_label(label, "size");
  return rings_[static_cast<size_t>(label)].count;
}

int64_t MemoryBank::capacity() const { return capacity_; }
int64_t MemoryBank::num_classes() const { return num_classes_; }
const std::vector<int64_t>& MemoryBank::item_shape() const { return item_shape_; }
int64_t MemoryBank::item_numel() const { return item_numel_; }

void MemoryBank::clear() {
  for (auto& r : rings_) {
    r.count = 0;
    r.next = 0;
  }
}

torch::Tensor MemoryBank::storage(int64_t label) const {
  check_label(label, "storage");
  return rings_[static_cast<size_t>(label)].data;
}

torch::Tensor MemoryBank::norms(int64_t label) const {
  check_label(label, "norms");
  return rings_[static_cast<size_t>(label)].norms;
}

int64_t MemoryBank::head(int64_t label) const {
  check_label(label, "head");
  const Ring& r = rings_[static_cast<size_t>(label)];
  return r.count < capacity_ ? 0 : r.next;
}

int64_t MemoryBank::slot(int64_t label, int64_t index) const {
  const int64_t n = size(label);
  if (index < 0 || index >= n) {
    throw Error(fmt::format("MemoryBank::slot: index {} out of range [0, {}) for label {}", index, n, label));
  }
  return (head(label) + index) % capacity_;
}

std::map<std::string, torch::Tensor> MemoryBank::state(const std::string& prefix) const {
  std::map<std::string, torch::Tensor> out;
  out[prefix + "num_classes"] = torch::tensor(num_classes_, torch::kLong);
  out[prefix + "capacity"] = torch::tensor(capacity_, torch::kLong);
  for (int64_t c = 0; c < num_classes_; ++c) {
    if (size(c) > 0) out[fmt::format("{}class.{}", prefix, c)] = get(c);
  }
  return out;
}

void MemoryBank::load_state(const std::map<std::string, torch::Tensor>& state, const std::string& prefix) {
  auto scalar = [&](const std::string& key) -> int64_t {
    auto it = state.find(prefix + key);
    if (it == state.end() || it->second.numel() != 1) {
      throw Error(fmt::format("MemoryBank::load_state: missing or non-scalar key '{}{}'", prefix, key));
    }
    return it->second.item<int64_t>();
  };
  const int64_t nc = scalar("num_classes");
  const int64_t cap = scalar("capacity");
  if (nc != num_classes_ || cap != capacity_) {
    throw Error(fmt::format("MemoryBank::load_state: state has num_classes={} capacity={}, bank has {} and {}", nc, cap,
                            num_classes_, capacity_));
  }
  // Validate everything before touching the bank, so a bad state leaves it unchanged.
  std::vector<std::pair<int64_t, torch::Tensor>> classes;
  const std::string cls = prefix + "class.";
  for (const auto& [key, value] : state) {
    if (key.compare(0, cls.size(), cls) != 0) continue;
    const std::string num = key.substr(cls.size());
    int64_t c = -1;
    try {
      size_t used = 0;
      c = std::stoll(num, &used);
      if (used != num.size()) c = -1;
    } catch (const std::exception&) {
      c = -1;
    }
    if (c < 0 || c >= num_classes_) throw Error(fmt::format("MemoryBank::load_state: bad class key '{}'", key));
    if (value.dim() < 1 || value.size(0) > capacity_) {
      throw Error(fmt::format("MemoryBank::load_state: '{}' has shape {}, expected [<= {}, ...]", key,
                              shape_str(value.sizes()), capacity_));
    }
    if (has_layout_ && value.sizes().slice(1).vec() != item_shape_) {
      throw Error(fmt::format("MemoryBank::load_state: '{}' item shape {} differs from the bank's {}", key,
                              shape_str(value.sizes().slice(1)), shape_str(item_shape_)));
    }
    if (!classes.empty() && value.sizes().slice(1) != classes.front().second.sizes().slice(1)) {
      throw Error(fmt::format("MemoryBank::load_state: '{}' item shape {} differs from the other classes' {}", key,
                              shape_str(value.sizes().slice(1)), shape_str(classes.front().second.sizes().slice(1))));
    }
    classes.emplace_back(c, value);
  }
  clear();
  for (const auto& [c, value] : classes) {
    push(value, torch::full({value.size(0)}, c, torch::kLong));
  }
}

}  // namespace mdd
