#include "train/data_parallel.h"

#include <exception>

#include <fmt/format.h>
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
