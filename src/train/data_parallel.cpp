#include "train/data_parallel.h"

#include <exception>

#include <fmt/format.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/torch.h>

#include "mdd/train/checkpoint.h"
#include "mdd/util/error.h"

namespace mdd::detail {

void check_batch_divides(const char* who, int64_t batch, const dist::ProcessGroup& pg) {
  const int64_t w = pg.world_size();
  if (w > 1 && batch % w != 0)
    throw Error(fmt::format("{}: batch_size {} is not a multiple of the {} processes (each computes an equal share of "
                            "every global batch)", who, batch, w));
}

std::pair<int64_t, int64_t> batch_shard(int64_t batch, const dist::ProcessGroup& pg) {
  const int64_t per = batch / pg.world_size();
  return {pg.rank() * per, (pg.rank() + 1) * per};
}

void broadcast_from_main(dist::ProcessGroup pg, const torch::nn::Module& module) {
  torch::NoGradGuard ng;
  for (auto& p : module.named_parameters()) pg.broadcast(p.value(), 0);
  for (auto& b : module.named_buffers()) pg.broadcast(b.value(), 0);
}

void average_gradients(dist::ProcessGroup pg, const std::vector<torch::Tensor>& params, int64_t bucket_bytes) {
  std::vector<torch::Tensor> bucket;
  int64_t bytes = 0;
  auto flush = [&] {
    if (!bucket.empty()) pg.all_reduce_mean(bucket);
    bucket.clear();
    bytes = 0;
  };
  for (torch::Tensor p : params) {
    if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
    const int64_t nb = p.grad().numel() * int64_t(p.grad().element_size());
    if (bucket_bytes > 0 && bytes > 0 && bytes + nb > bucket_bytes) flush();
    bucket.push_back(p.grad());
    bytes += nb;
  }
  flush();
}

struct OverlappedGradAverager::State {
  struct Bucket {
    std::vector<size_t> members;  // indices into params
    int64_t pending = 0;          // gradients still to come in this window
    bool started = false;
    torch::Tensor flat;
    dist::Work work;
  };
  dist::ProcessGroup pg;
  std::vector<torch::Tensor> params;
  std::vector<size_t> bucket_of;
  std::vector<char> arrived;
  std::vector<Bucket> buckets;
  size_t next = 0;  // first bucket not started yet
  bool armed = false;
  // Strong references keep each parameter's accumulator (and the hook on it) alive between steps.
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;
  std::vector<uintptr_t> hook_keys;

  void start(Bucket& b) {
    std::vector<torch::Tensor> flat;
    flat.reserve(b.members.size());
    for (size_t i : b.members) {
      torch::Tensor p = params[i];
      if (!p.grad().defined()) p.mutable_grad() = torch::zeros_like(p);
      flat.push_back(p.grad().detach().reshape({-1}));
    }
    b.flat = flat.size() == 1 ? flat[0].clone() : torch::cat(flat);
    b.work = pg.all_reduce_sum_async(b.flat);
    b.started = true;
  }
  // Starts every bucket that is complete and whose predecessors have started.
  void start_ready() {
    while (next < buckets.size() && buckets[next].pending == 0) start(buckets[next++]);
  }
  void on_gradient(size_t i) {
    if (!armed || arrived[i]) return;
    arrived[i] = 1;
    Bucket& b = buckets[bucket_of[i]];
    if (--b.pending == 0) start_ready();
  }
};

OverlappedGradAverager::OverlappedGradAverager(dist::ProcessGroup pg, std::vector<torch::Tensor> params,
                                               int64_t bucket_bytes)
    : state_(std::make_shared<State>()) {
  State& st = *state_;
  st.pg = pg;
  st.params = std::move(params);
  st.bucket_of.assign(st.params.size(), 0);
  st.arrived.assign(st.params.size(), 0);
  int64_t bytes = 0;
  for (size_t k = st.params.size(); k-- > 0;) {  // reverse: gradients of the last layers come first
    const torch::Tensor& p = st.params[k];
    if (!p.requires_grad() || !p.is_leaf())
      throw Error("OverlappedGradAverager: every parameter must be a leaf tensor that requires grad");
    const int64_t nb = p.numel() * int64_t(p.element_size());
    const bool new_bucket = st.buckets.empty() ||
                            p.scalar_type() != st.params[st.buckets.back().members.front()].scalar_type() ||
                            (bucket_bytes > 0 && bytes > 0 && bytes + nb > bucket_bytes);
    if (new_bucket) {
      st.buckets.emplace_back();
      bytes = 0;
    }
    st.buckets.back().members.push_back(k);
    st.bucket_of[k] = st.buckets.size() - 1;
    bytes += nb;
  }
  std::weak_ptr<State> weak = state_;  // a hook that outlives this object does nothing
  for (size_t k = 0; k < st.params.size(); ++k) {
    auto acc = torch::autograd::impl::grad_accumulator(st.params[k]);
    if (!acc) throw Error("OverlappedGradAverager: no gradient accumulator for a parameter");
    st.hook_keys.push_back(acc->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
        [weak, k](const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) {
          if (auto s = weak.lock()) s->on_gradient(k);
          return outputs;
        })));
    st.accumulators.push_back(std::move(acc));
  }
}

OverlappedGradAverager::~OverlappedGradAverager() {
  for (size_t k = 0; k < state_->accumulators.size(); ++k) state_->accumulators[k]->del_post_hook(state_->hook_keys[k]);
}

size_t OverlappedGradAverager::buckets() const { return state_->buckets.size(); }

void OverlappedGradAverager::arm() {
  State& st = *state_;
  std::fill(st.arrived.begin(), st.arrived.end(), 0);
  for (auto& b : st.buckets) {
    b.pending = int64_t(b.members.size());
    b.started = false;
    b.flat = torch::Tensor();
    b.work = dist::Work();
  }
  st.next = 0;
  st.armed = true;
}

size_t OverlappedGradAverager::finish() {
  State& st = *state_;
  if (!st.armed) throw Error("OverlappedGradAverager::finish without arm()");
  st.armed = false;
  const size_t early = st.next;
  // Gradients the graph did not reach: their buckets start now, still in index order.
  for (auto& b : st.buckets) b.pending = 0;
  st.start_ready();
  const double w = double(st.pg.world_size());
  torch::NoGradGuard no_grad;
  for (auto& b : st.buckets) {
    b.work.wait();
    int64_t offset = 0;
    for (size_t i : b.members) {
      torch::Tensor g = st.params[i].mutable_grad();
      const int64_t n = g.numel();
      g.copy_(b.flat.narrow(0, offset, n).view(g.sizes()));
      g.div_(w);
      offset += n;
    }
    b.flat = torch::Tensor();
  }
  return early;
}

std::string write_checkpoint_on_main(dist::ProcessGroup pg, const std::function<std::string()>& write,
                                     const std::string& dir, int64_t step) {
  if (pg.world_size() == 1) return write();
  std::string path, error;
  if (pg.is_main()) {
    try {
      path = write();
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  torch::Tensor ok = torch::full({1}, error.empty() ? 1 : 0, torch::kInt64);
  pg.broadcast(ok, 0);
  if (!error.empty()) throw Error(error);
  const std::string expected = checkpoint_info(dir, step).weights_path;
  if (ok.item<int64_t>() == 0) throw Error(fmt::format("rank 0 failed to write the checkpoint {} (see its log)", expected));
  return pg.is_main() ? path : expected;
}

bool resume_in_order(dist::ProcessGroup pg, const std::function<bool(bool is_main)>& resume_own,
                     const std::function<int64_t()>& step) {
  if (pg.world_size() == 1) return resume_own(true);
  bool found = false;
  std::exception_ptr failed;
  if (!pg.is_main()) pg.barrier();
  try {
    found = resume_own(pg.is_main());
  } catch (...) {
    failed = std::current_exception();
  }
  if (pg.is_main()) pg.barrier();
  if (failed) std::rethrow_exception(failed);
  pg.check_same("resumed checkpoint step", std::to_string(found ? step() : -1));
  return found;
}

}  // namespace mdd::detail
