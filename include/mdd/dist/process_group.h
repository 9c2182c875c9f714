#pragma once
/// \file
/// Several processes working as one: a thin layer over LibTorch's own distributed engine (c10d:
/// `TCPStore` rendezvous, `ProcessGroupGloo` on CPU, `ProcessGroupNCCL` for CUDA tensors where the
/// build has it). mdd writes no transport of its own.
///
/// A `ProcessGroup` is joined from the torchrun / SLURM environment (`DistOptions::from_env`) or
/// from explicit options. With `world_size` 1 it is a single process: no store, no sockets, every
/// collective is the identity, so code written against it runs unchanged without a launcher.
/// Every collective and the rendezvous honour `DistOptions::timeout`: a peer that died or never came
/// makes the others throw `mdd::Error` (naming the operation and rank) instead of hanging.

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <torch/arg.h>
#include <torch/types.h>

#include "mdd/export.h"

namespace mdd::dist {

/// How a process joins its group.
struct MDD_API DistOptions {
  /// This process's index in [0, world_size).
  TORCH_ARG(int64_t, rank) = 0;
  /// Number of processes; 1 = a single process (no rendezvous).
  TORCH_ARG(int64_t, world_size) = 1;
  /// Index of this process on its node (picks the GPU: see `bind_cuda_device`).
  TORCH_ARG(int64_t, local_rank) = 0;
  /// Host of rank 0's rendezvous store (rank 0 serves it).
  TORCH_ARG(std::string, master_addr) = "127.0.0.1";
  /// Port of the rendezvous store.
  TORCH_ARG(int64_t, master_port) = 29500;
  /// Limit for the rendezvous and for every collective.
  TORCH_ARG(std::chrono::milliseconds, timeout) = std::chrono::minutes(5);
  /// Network interface address Gloo binds to ("" = the address `master_addr` resolves through, or
  /// the host name's address).
  TORCH_ARG(std::string, interface_address) = "";
  /// CUDA tensors go through NCCL (`ProcessGroupNCCL`, no host copy) when this build has it
  /// (`nccl_available()`) and a GPU is visible; false, or without it, they travel through host
  /// copies over Gloo. CPU tensors always use Gloo. `from_env` reads MDD_DIST_NCCL=0 as false.
  TORCH_ARG(bool, nccl) = true;
  /// Joining a group of several processes makes cuda:<local_rank mod visible GPUs> this process's
  /// current CUDA device (as torchrun scripts call `torch.cuda.set_device(local_rank)`), so a bare
  /// "cuda" device means one GPU per local rank. False leaves the current device alone.
  TORCH_ARG(bool, bind_cuda_device) = true;

 public:
  /// Reads the launcher's environment: torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
  /// MASTER_PORT, else SLURM's SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID (MASTER_ADDR/PORT still
  /// needed); none set = a single process. MDD_DIST_TIMEOUT_S overrides the timeout. Throws
  /// `mdd::Error` naming the variable for values that are not integers or out of range.
  static DistOptions from_env();
};

/// True when this build of mdd can join groups of more than one process (LibTorch's c10d with Gloo
/// was found at build time); false builds still run world size 1.
MDD_API bool distributed_available();

/// True when this build of mdd also has LibTorch's `ProcessGroupNCCL` (a CUDA build whose LibTorch
/// ships it, found at build time), so groups can reduce CUDA tensors on the GPU.
MDD_API bool nccl_available();

namespace detail {
class GroupBackend;
class PendingWork;
}  // namespace detail

/// A collective started by `ProcessGroup::all_reduce_sum_async`. `wait()` blocks until it is done
/// (throwing `mdd::Error` when a peer stopped or the timeout passed) and leaves the result in the
/// tensor that was passed; later calls return at once. A default-constructed Work is already done.
class MDD_API Work {
 public:
  Work();
  void wait();

 private:
  friend class ProcessGroup;
  std::shared_ptr<detail::PendingWork> pending_;
};

/// A group of processes and the collectives mdd needs. Copies share the group. Collectives must be
/// called by every rank in the same order with tensors of the same shape and dtype (c10d's rule);
/// tensors may live on any device: CPU tensors use Gloo, CUDA tensors NCCL where the group has it
/// (`uses_nccl`), else a host copy over Gloo.
class MDD_API ProcessGroup {
 public:
  /// A single process (rank 0 of 1).
  ProcessGroup();
  /// Joins the group described by `options` (rendezvous through rank 0's store; blocks until all
  /// `world_size` processes have joined or `timeout` passes). Throws `mdd::Error` on bad options,
  /// a timeout, or when this build has no distributed support and world_size > 1. With
  /// world_size > 1 it sets SIGPIPE to "ignore" if the program left it at the default (as Python
  /// does): Gloo's writes to a dead peer would otherwise kill the process instead of failing the
  /// collective with `mdd::Error`.
  explicit ProcessGroup(const DistOptions& options);

  int64_t rank() const noexcept { return rank_; }
  int64_t world_size() const noexcept { return world_size_; }
  int64_t local_rank() const noexcept { return local_rank_; }
  /// Rank 0: the process that writes files (checkpoints, reports) and draws progress.
  bool is_main() const noexcept { return rank_ == 0; }
  /// True when collectives on CUDA tensors run on NCCL (see `DistOptions::nccl`).
  bool uses_nccl() const noexcept;

  /// Element-wise sum over ranks, in place in every tensor (all ranks end with the same values).
  void all_reduce_sum(std::vector<torch::Tensor>& tensors);
  /// Element-wise mean over ranks, in place (floating-point tensors).
  void all_reduce_mean(std::vector<torch::Tensor>& tensors);
  /// Starts the element-wise sum of `tensor` over ranks and returns at once: the transfer runs on
  /// c10d's threads (NCCL's stream for CUDA tensors under `uses_nccl`) while this thread goes on,
  /// e.g. with the rest of a backward pass. The sum lands in `tensor` by the time `wait()` returns;
  /// until then it must not be read or written. Async collectives count like the others: every
  /// rank starts the same ones in the same order.
  Work all_reduce_sum_async(torch::Tensor tensor);
  /// The tensors of all ranks concatenated along dim 0 in rank order (each rank passes the same
  /// shape and dtype).
  torch::Tensor all_gather(const torch::Tensor& tensor);
  /// Overwrites `tensor` on every rank with `root`'s.
  void broadcast(torch::Tensor& tensor, int64_t root = 0);
  /// Returns once every rank has called it.
  void barrier();
  /// The same with its own time limit instead of `DistOptions::timeout`: for waiting while one
  /// rank does a long job alone (encoding a dataset, training the codec). It waits through the
  /// rendezvous store, not a collective, so the limit holds even past `DistOptions::timeout`. Rank 0
  /// exiting ends the others' wait at once with an error; another rank that exits leaves rank 0
  /// waiting until the limit or until the launcher (`--nproc`, torchrun) stops it.
  void barrier(std::chrono::milliseconds timeout);
  /// Throws `mdd::Error` on every rank unless all ranks pass the same `text` (e.g. the resolved
  /// config): the message names `what` and the first rank that differs.
  void check_same(const std::string& what, const std::string& text);

 private:
  std::shared_ptr<detail::GroupBackend> backend_;
  int64_t rank_ = 0;
  int64_t world_size_ = 1;
  int64_t local_rank_ = 0;
};

}  // namespace mdd::dist
