#include "mdd/dist/process_group.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <exception>
#include <optional>
#include <type_traits>
#include <utility>

#include <csignal>

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <fmt/format.h>
#include <torch/torch.h>

#include "mdd/util/error.h"
#include "util/fnv.h"

#ifdef MDD_HAVE_C10D_GLOO
// c10d's headers (and the Gloo headers they include) stay in this one translation unit: the public
// header hides them, so users never need them and their ABI never reaches mdd's interface.
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif
#ifdef MDD_HAVE_C10D_NCCL
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace mdd::dist {
namespace {

// Reads an integer environment variable in [lo, hi]; nullopt when unset or empty.
std::optional<int64_t> env_int(const char* name, int64_t lo, int64_t hi) {
  const char* v = std::getenv(name);
  if (!v || !*v) return std::nullopt;
  errno = 0;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  if (errno != 0 || end == v || *end != '\0')
    throw Error(fmt::format("dist: environment variable {}='{}' is not an integer", name, v));
  if (x < lo || x > hi)
    throw Error(fmt::format("dist: environment variable {}={} is outside [{}, {}]", name, x, lo, hi));
  return x;
}

std::string env_str(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

void check_options(const DistOptions& o) {
  if (o.world_size() < 1) throw Error(fmt::format("dist: world_size must be >= 1, got {}", o.world_size()));
  if (o.rank() < 0 || o.rank() >= o.world_size())
    throw Error(fmt::format("dist: rank {} is outside [0, world_size {})", o.rank(), o.world_size()));
  if (o.local_rank() < 0) throw Error(fmt::format("dist: local_rank must be >= 0, got {}", o.local_rank()));
  if (o.world_size() > 1) {
    if (o.master_addr().empty()) throw Error("dist: master_addr is empty (set MASTER_ADDR)");
    if (o.master_port() < 1 || o.master_port() > 65535)
      throw Error(fmt::format("dist: master_port {} is not a TCP port", o.master_port()));
    if (o.timeout().count() <= 0) throw Error("dist: timeout must be positive");
  }
}

// The same in every process and build (std::hash need not be).
int64_t stable_hash(const std::string& s) { return static_cast<int64_t>(fnv1a64(s)); }

}  // namespace

DistOptions DistOptions::from_env() {
  DistOptions o;
  const int64_t kMaxRanks = int64_t(1) << 24;
  auto world = env_int("WORLD_SIZE", 1, kMaxRanks);
  auto rank = env_int("RANK", 0, kMaxRanks - 1);
  auto local = env_int("LOCAL_RANK", 0, kMaxRanks - 1);
  if (!world && !rank) {  // not torchrun: maybe an srun task
    world = env_int("SLURM_NTASKS", 1, kMaxRanks);
    rank = env_int("SLURM_PROCID", 0, kMaxRanks - 1);
    local = env_int("SLURM_LOCALID", 0, kMaxRanks - 1);
  }
  if (world.value_or(1) > 1 && !rank) throw Error("dist: WORLD_SIZE > 1 but RANK is not set");
  o.world_size(world.value_or(1)).rank(rank.value_or(0)).local_rank(local.value_or(0));
  if (const std::string addr = env_str("MASTER_ADDR"); !addr.empty()) o.master_addr(addr);
  if (auto port = env_int("MASTER_PORT", 1, 65535)) o.master_port(*port);
  if (auto t = env_int("MDD_DIST_TIMEOUT_S", 1, 7 * 24 * 3600)) o.timeout(std::chrono::seconds(*t));
  if (auto n = env_int("MDD_DIST_NCCL", 0, 1)) o.nccl(*n == 1);
  check_options(o);
  return o;
}

bool distributed_available() {
#ifdef MDD_HAVE_C10D_GLOO
  return true;
#else
  return false;
#endif
}

bool nccl_available() {
#ifdef MDD_HAVE_C10D_NCCL
  return true;
#else
  return false;
#endif
}

namespace detail {

// What a multi-process group holds; absent (nullptr) for a single process.
class GroupBackend {
 public:
#ifdef MDD_HAVE_C10D_GLOO
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo;
#endif
#ifdef MDD_HAVE_C10D_NCCL
  // CUDA tensors; absent without a GPU or with DistOptions::nccl(false). Its communicators are made
  // on the first collective per device set (c10d's rule), so creating it costs nothing up front.
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> nccl;
#endif
  std::chrono::milliseconds timeout{0};
  int64_t rank = 0, world_size = 1;
  int64_t long_barriers = 0;  // barriers with their own timeout so far (their store keys' sequence)

  // Runs one collective; any failure (a peer gone, a timeout) becomes an mdd::Error naming it.
  template <typename F>
  void run(const char* op, F&& start, std::chrono::milliseconds limit = std::chrono::milliseconds(0)) {
    if (limit.count() <= 0) limit = timeout;
    try {
      auto work = start();
      work->wait(limit);
    } catch (const std::exception& e) {
      throw failure(op, limit, e);
    }
  }

  Error failure(const char* op, std::chrono::milliseconds limit, const std::exception& e) const {
    return Error(fmt::format("dist: {} failed on rank {} of {} (a peer stopped or the {} s timeout passed): {}", op,
                             rank, world_size, limit.count() / 1000.0, first_line(e.what())));
  }

  static std::string first_line(const std::string& s) {
    const auto nl = s.find('\n');
    return nl == std::string::npos ? s : s.substr(0, nl);
  }
};

#ifdef MDD_HAVE_C10D_GLOO
// c10d's handle of a running collective (ProcessGroup::Work in LibTorch 1.13, c10d::Work in 2.x).
using WorkPtr = decltype(std::declval<c10d::ProcessGroupGloo&>().allreduce(std::declval<std::vector<at::Tensor>&>()));
#endif

// An all-reduce in flight: the buffer c10d works on and the tensor the result goes back to.
class PendingWork {
 public:
  std::shared_ptr<GroupBackend> backend;
  const char* op = "all_reduce";
  torch::Tensor target, buffer;
#ifdef MDD_HAVE_C10D_GLOO
  WorkPtr work;
#endif
  bool done = false;

  void wait() {
    if (done) return;
    done = true;  // a failed wait is not retried: the group is unusable after it anyway
#ifdef MDD_HAVE_C10D_GLOO
    try {
      work->wait(backend->timeout);
    } catch (const std::exception& e) {
      throw backend->failure(op, backend->timeout, e);
    }
#endif
    if (!buffer.is_alias_of(target)) {  // the work ran on a copy (host or contiguous)
      torch::NoGradGuard no_grad;
      target.copy_(buffer);
    }
  }
};

}  // namespace detail

Work::Work() = default;

void Work::wait() {
  if (pending_) pending_->wait();
}

ProcessGroup::ProcessGroup() = default;

bool ProcessGroup::uses_nccl() const noexcept {
#ifdef MDD_HAVE_C10D_NCCL
  return backend_ && backend_->nccl;
#else
  return false;
#endif
}

namespace {
// Gloo writes to its peers' sockets without MSG_NOSIGNAL: when a peer has died, the write raises
// SIGPIPE, whose default action kills this process before the collective can report the error.
// Python's interpreter ignores SIGPIPE at start-up, so the reference never sees this; a C++
// program does. A default disposition is switched to "ignore" (the write then fails with EPIPE
// and the collective throws); a handler the program installed itself is left alone.
void ignore_sigpipe_unless_handled() {
#if defined(SIGPIPE)
  struct sigaction current {};
  if (sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) {
    struct sigaction ignore {};
    ignore.sa_handler = SIG_IGN;
    sigemptyset(&ignore.sa_mask);
    sigaction(SIGPIPE, &ignore, nullptr);
  }
#endif
}
}  // namespace

ProcessGroup::ProcessGroup(const DistOptions& options) {
  check_options(options);
  rank_ = options.rank();
  world_size_ = options.world_size();
  local_rank_ = options.local_rank();
  if (world_size_ == 1) return;
  ignore_sigpipe_unless_handled();
  if (options.bind_cuda_device() && torch::cuda::is_available()) {
    const auto gpus = static_cast<int64_t>(torch::cuda::device_count());
    c10::impl::getDeviceGuardImpl(c10::kCUDA)->setDevice(
        c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(local_rank_ % gpus)));
  }
#ifdef MDD_HAVE_C10D_GLOO
  auto b = std::make_shared<detail::GroupBackend>();
  b->timeout = options.timeout();
  b->rank = rank_;
  b->world_size = world_size_;
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<uint16_t>(options.master_port());
    so.isServer = rank_ == 0;
    so.numWorkers = static_cast<std::size_t>(world_size_);
    so.timeout = options.timeout();
    b->store = c10::make_intrusive<c10d::TCPStore>(options.master_addr(), so);
    auto go = c10d::ProcessGroupGloo::Options::create();
    go->timeout = options.timeout();
    const std::string& ma = options.master_addr();
    const bool loopback = ma == "localhost" || ma.rfind("127.", 0) == 0 || ma == "::1";
    if (!options.interface_address().empty())
      go->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(options.interface_address()));
    else if (loopback)
      go->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    else
      go->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    b->gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(b->store, static_cast<int>(rank_),
                                                           static_cast<int>(world_size_), go);
#ifdef MDD_HAVE_C10D_NCCL
    if (options.nccl() && torch::cuda::is_available()) {
      auto no = c10d::ProcessGroupNCCL::Options::create();
      no->timeout = options.timeout();
      // Its own key space in the shared store, so its rendezvous keys never meet Gloo's.
      b->nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(c10::make_intrusive<c10d::PrefixStore>("mdd-nccl", b->store),
                                                             static_cast<int>(rank_), static_cast<int>(world_size_), no);
    }
#endif
  } catch (const std::exception& e) {
    throw Error(fmt::format("dist: rank {} of {} could not join the group at {}:{} within {} s (is every rank "
                            "started, MASTER_ADDR/MASTER_PORT the same for all and the port free?): {}",
                            rank_, world_size_, options.master_addr(), options.master_port(),
                            options.timeout().count() / 1000.0, detail::GroupBackend::first_line(e.what())));
  }
  backend_ = std::move(b);
#else
  throw Error(fmt::format("dist: world_size {} needs distributed support, but this mdd was built without "
                          "LibTorch's c10d/Gloo (see docs/distributed.md)",
                          world_size_));
#endif
}

namespace {

// c10d's Gloo collectives take dense contiguous CPU tensors; others travel through a host copy.
struct HostView {
  torch::Tensor original, host;
  explicit HostView(const torch::Tensor& t) : original(t) {
    host = t.device().is_cpu() && t.is_contiguous() ? t : t.to(torch::kCPU).contiguous();
  }
  void write_back() {
    if (!host.is_same(original)) original.copy_(host);
  }
};

}  // namespace

void ProcessGroup::all_reduce_sum(std::vector<torch::Tensor>& tensors) {
  for (const auto& t : tensors)
    if (!t.defined()) throw Error("dist: all_reduce of an undefined tensor");
  if (!backend_ || tensors.empty()) return;
#ifdef MDD_HAVE_C10D_GLOO
  // One collective per dtype over a flat buffer: c10d reduces lists of same-typed, same-shaped
  // tensors only, and one large message beats many small ones (gradients arrive as hundreds).
  std::vector<bool> done(tensors.size(), false);
  for (size_t first = 0; first < tensors.size(); ++first) {
    if (done[first]) continue;
    const auto dtype = tensors[first].scalar_type();
    std::vector<size_t> group;
    for (size_t k = first; k < tensors.size(); ++k)
      if (!done[k] && tensors[k].scalar_type() == dtype) {
        group.push_back(k);
        done[k] = true;
      }
    // Flattened where they all live (NCCL can then reduce on the GPU), else on the host;
    // all_reduce_sum_async picks the backend for the buffer's device.
    const auto dev = tensors[group[0]].device();
    const bool one_device =
        std::all_of(group.begin(), group.end(), [&](size_t k) { return tensors[k].device() == dev; });
    std::vector<torch::Tensor> flat;
    for (size_t k : group) flat.push_back((one_device ? tensors[k].detach() : tensors[k].detach().cpu()).reshape({-1}));
    torch::Tensor buffer = group.size() == 1 ? flat[0].contiguous().clone() : torch::cat(flat);
    all_reduce_sum_async(buffer).wait();
    int64_t offset = 0;
    for (size_t k : group) {
      torch::Tensor& t = tensors[k];
      const int64_t n = t.numel();
      torch::NoGradGuard no_grad;
      t.copy_(buffer.narrow(0, offset, n).view(t.sizes()));
      offset += n;
    }
  }
#endif
}

Work ProcessGroup::all_reduce_sum_async(torch::Tensor tensor) {
  if (!tensor.defined()) throw Error("dist: all_reduce of an undefined tensor");
  Work w;
  if (!backend_) return w;
#ifdef MDD_HAVE_C10D_GLOO
  auto p = std::make_shared<detail::PendingWork>();
  p->backend = backend_;
  p->target = tensor;
  std::vector<at::Tensor> buf;
#ifdef MDD_HAVE_C10D_NCCL
  if (backend_->nccl && tensor.is_cuda()) {
    buf.push_back(tensor.is_contiguous() ? tensor.detach() : tensor.detach().contiguous());
    p->op = "all_reduce (NCCL)";
  }
#endif
  if (buf.empty()) {
    const bool direct = tensor.device().is_cpu() && tensor.is_contiguous();
    buf.push_back(direct ? tensor.detach() : tensor.detach().to(torch::kCPU).contiguous());
  }
  p->buffer = buf[0];
  try {
#ifdef MDD_HAVE_C10D_NCCL
    if (backend_->nccl && tensor.is_cuda()) p->work = backend_->nccl->allreduce(buf);
#endif
    if (!p->work) p->work = backend_->gloo->allreduce(buf);
  } catch (const std::exception& e) {
    throw backend_->failure(p->op, backend_->timeout, e);
  }
  w.pending_ = std::move(p);
#endif
  return w;
}

void ProcessGroup::all_reduce_mean(std::vector<torch::Tensor>& tensors) {
  for (const auto& t : tensors)
    if (t.defined() && !t.is_floating_point())
      throw Error(fmt::format("dist: all_reduce_mean needs floating-point tensors, got {}", c10::toString(t.scalar_type())));
  all_reduce_sum(tensors);
  if (world_size_ > 1)
    for (auto& t : tensors) t.div_(static_cast<double>(world_size_));
}

torch::Tensor ProcessGroup::all_gather(const torch::Tensor& tensor) {
  if (!tensor.defined()) throw Error("dist: all_gather of an undefined tensor");
  if (!backend_) return tensor.dim() == 0 ? tensor.reshape({1}) : tensor;
#ifdef MDD_HAVE_C10D_NCCL
  if (backend_->nccl && tensor.is_cuda()) {
    std::vector<at::Tensor> in{(tensor.dim() == 0 ? tensor.reshape({1}) : tensor).contiguous()};
    std::vector<std::vector<at::Tensor>> out(1);
    for (int64_t r = 0; r < world_size_; ++r) out[0].push_back(torch::empty_like(in[0]));
    backend_->run("all_gather (NCCL)", [&] { return backend_->nccl->allgather(out, in); });
    return torch::cat(out[0], 0);
  }
#endif
#ifdef MDD_HAVE_C10D_GLOO
  HostView v(tensor.dim() == 0 ? tensor.reshape({1}) : tensor);
  std::vector<std::vector<at::Tensor>> out(1);
  for (int64_t r = 0; r < world_size_; ++r) out[0].push_back(torch::empty_like(v.host));
  std::vector<at::Tensor> in{v.host};
  backend_->run("all_gather", [&] { return backend_->gloo->allgather(out, in); });
  return torch::cat(out[0], 0).to(tensor.device());
#else
  return tensor;
#endif
}

void ProcessGroup::broadcast(torch::Tensor& tensor, int64_t root) {
  if (root < 0 || root >= world_size_)
    throw Error(fmt::format("dist: broadcast root {} is outside [0, {})", root, world_size_));
  if (!backend_) return;
#ifdef MDD_HAVE_C10D_GLOO
  if (!tensor.defined()) throw Error("dist: broadcast of an undefined tensor");
  c10d::BroadcastOptions bo;
  bo.rootRank = root;
#ifdef MDD_HAVE_C10D_NCCL
  if (backend_->nccl && tensor.is_cuda()) {
    std::vector<at::Tensor> dev{tensor.is_contiguous() ? tensor : tensor.contiguous()};
    backend_->run("broadcast (NCCL)", [&] { return backend_->nccl->broadcast(dev, bo); });
    if (!dev[0].is_same(tensor)) tensor.copy_(dev[0]);
    return;
  }
#endif
  HostView v(tensor);
  std::vector<at::Tensor> host{v.host};
  backend_->run("broadcast", [&] { return backend_->gloo->broadcast(host, bo); });
  v.write_back();
#endif
}

void ProcessGroup::barrier() {
  if (!backend_) return;
#ifdef MDD_HAVE_C10D_GLOO
  backend_->run("barrier", [&] { return backend_->gloo->barrier(); });
#endif
}

void ProcessGroup::barrier(std::chrono::milliseconds timeout) {
  if (timeout.count() <= 0) throw Error("dist: barrier timeout must be positive");
  if (!backend_) return;
#ifdef MDD_HAVE_C10D_GLOO
  // Not a Gloo barrier: Gloo waits at most its context's timeout (DistOptions::timeout) whatever
  // BarrierOptions says (LibTorch 1.13 ignores it), so ranks waiting while rank 0 encoded a dataset
  // for longer than 5 minutes failed. Through the store each rank sets its own key of this barrier
  // and waits for all of them; rank 0 hosts the store, so its exit still ends the wait at once.
  // Every rank calls the barriers in the same order, so the counters agree.
  const int64_t seq = backend_->long_barriers++;
  std::vector<std::string> keys;
  for (int64_t r = 0; r < world_size_; ++r) keys.push_back(fmt::format("mdd-long-barrier/{}/{}", seq, r));
  try {
    backend_->store->set(keys[size_t(rank_)], std::vector<uint8_t>{1});
    backend_->store->wait(keys, timeout);
  } catch (const std::exception& e) {
    throw backend_->failure("barrier", timeout, e);
  }
#endif
}

void ProcessGroup::check_same(const std::string& what, const std::string& text) {
  if (!backend_) return;
  const torch::Tensor mine = torch::tensor({stable_hash(text), static_cast<int64_t>(text.size())}, torch::kInt64);
  const torch::Tensor all = all_gather(mine).view({world_size_, 2});
  for (int64_t r = 0; r < world_size_; ++r)
    if (!torch::equal(all[r], all[0]))
      throw Error(fmt::format("dist: {} differs between rank 0 and rank {} (every rank must use the same; this is rank {})",
                              what, r, rank_));
}

}  // namespace mdd::dist
