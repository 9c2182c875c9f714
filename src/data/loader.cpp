#include "mdd/data/loader.h"

#include <algorithm>
#include <numeric>

#include <fmt/format.h>

#include "mdd/util/error.h"

namespace mdd {
namespace {

// splitmix64: a fixed, portable generator, so the order of an epoch is the same on every platform
// and LibTorch version (std:: distributions and torch::randperm are implementation-defined).
uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

BatchLoader::BatchLoader(int64_t size, SampleFn sample, torch::Tensor labels, BatchLoaderOptions options)
    : size_(size), sample_(std::move(sample)), labels_(std::move(labels)), options_(std::move(options)) {
  if (size_ < 0) throw Error(fmt::format("BatchLoader: size must be >= 0, got {}", size_));
  if (!sample_) throw Error("BatchLoader: empty sample function");
  if (options_.batch_size() <= 0) throw Error(fmt::format("BatchLoader: batch_size must be positive, got {}", options_.batch_size()));
  if (options_.num_workers() <= 0) throw Error(fmt::format("BatchLoader: num_workers must be positive, got {}", options_.num_workers()));
  if (options_.prefetch_batches() <= 0)
    throw Error(fmt::format("BatchLoader: prefetch_batches must be positive, got {}", options_.prefetch_batches()));
  if (labels_.defined()) {
    if (labels_.dim() != 1 || labels_.size(0) != size_)
      throw Error(fmt::format("BatchLoader: labels must be [{}], got {} dims with {} entries", size_, labels_.dim(),
                              labels_.numel()));
    labels_ = labels_.to(torch::kCPU).contiguous();
  }
  order_ = order(0);
  for (int64_t i = 0; i < options_.num_workers(); ++i) workers_.emplace_back([this] { worker_loop(); });
}

BatchLoader::~BatchLoader() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

int64_t BatchLoader::batches_per_epoch() const {
  const int64_t b = options_.batch_size();
  return options_.drop_last() ? size_ / b : (size_ + b - 1) / b;
}

int64_t BatchLoader::epoch() const {
  std::lock_guard<std::mutex> lock(mu_);
  return epoch_;
}

std::vector<int64_t> BatchLoader::order(int64_t epoch) const {
  std::vector<int64_t> perm(static_cast<size_t>(size_));
  std::iota(perm.begin(), perm.end(), int64_t(0));
  if (options_.shuffle()) {
    uint64_t state = options_.seed() ^ (uint64_t(epoch) * 0xD1B54A32D192ED03ull);
    splitmix64(state);
    // Fisher-Yates; index drawn by the multiply-shift map of a 64-bit draw onto [0, i].
    for (int64_t i = size_ - 1; i > 0; --i) {
      const auto j = int64_t((unsigned __int128)splitmix64(state) * uint64_t(i + 1) >> 64);
      std::swap(perm[size_t(i)], perm[size_t(j)]);
    }
  }
  return perm;
}

void BatchLoader::start_epoch(int64_t epoch) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (epoch == epoch_ && consumed_ == 0) return;
    ++generation_;  // batches still being built for the old epoch are dropped when they finish
    epoch_ = epoch;
    order_ = order(epoch);
    ready_.clear();
    next_claim_ = 0;
    consumed_ = 0;
  }
  cv_.notify_all();
}

Batch BatchLoader::build(int64_t batch_index, const std::vector<int64_t>& indices) const {
  std::vector<torch::Tensor> items;
  items.reserve(indices.size());
  for (int64_t idx : indices) {
    try {
      items.push_back(sample_(idx));
    } catch (const std::exception& e) {
      throw Error(fmt::format("BatchLoader: sample {} (batch {}) failed: {}", idx, batch_index, e.what()));
    }
    if (!items.back().defined()) throw Error(fmt::format("BatchLoader: sample {} returned an undefined tensor", idx));
    if (items.back().sizes() != items.front().sizes())
      throw Error(fmt::format("BatchLoader: sample {} has shape {} but sample {} has {}", idx,
                              c10::str(items.back().sizes()), indices.front(), c10::str(items.front().sizes())));
  }
  Batch b;
  b.data = torch::stack(items);
  b.indices = torch::tensor(indices, torch::kInt64);
  if (labels_.defined()) b.labels = labels_.index_select(0, b.indices);
  return b;
}

void BatchLoader::worker_loop() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    cv_.wait(lock, [&] {
      return stop_ || (next_claim_ < batches_per_epoch() && next_claim_ < consumed_ + options_.prefetch_batches());
    });
    if (stop_) return;
    const int64_t b = next_claim_++;
    const uint64_t gen = generation_;
    const int64_t begin = b * options_.batch_size();
    const int64_t end = std::min(size_, begin + options_.batch_size());
    std::vector<int64_t> indices(order_.begin() + begin, order_.begin() + end);
    lock.unlock();
    Slot slot;
    try {
      slot.batch = build(b, indices);
    } catch (...) {
      slot.error = std::current_exception();
    }
    lock.lock();
    if (gen == generation_ && !stop_) {
      ready_.emplace(b, std::move(slot));
      cv_.notify_all();
    }
  }
}

bool BatchLoader::next(Batch& out) {
  Slot slot;
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (consumed_ >= batches_per_epoch()) return false;
    cv_.wait(lock, [&] { return ready_.count(consumed_) > 0; });
    auto it = ready_.find(consumed_);
    slot = std::move(it->second);
    ready_.erase(it);
    ++consumed_;
  }
  cv_.notify_all();  // a prefetch slot is free again
  if (slot.error) {
    try {
      std::rethrow_exception(slot.error);
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw Error(fmt::format("BatchLoader: {}", e.what()));
    }
  }
  out = std::move(slot.batch);
  return true;
}

std::unique_ptr<BatchLoader> make_image_folder_loader(const ImageFolder& folder, ImageTransform transform,
                                                      BatchLoaderOptions options) {
  auto f = std::make_shared<const ImageFolder>(folder);
  auto fn = [f, transform = std::move(transform)](int64_t i) {
    torch::Tensor img = f->read(i);
    return transform ? transform(img) : img;
  };
  return std::make_unique<BatchLoader>(folder.size(), std::move(fn), folder.labels(), std::move(options));
}

}  // namespace mdd
