#include "mdd/util/threads.h"

#include <dlfcn.h>

#include <string>

#include <ATen/Parallel.h>

#include "mdd/util/error.h"

namespace mdd {
namespace {

// OpenBLAS's C entry points, looked up in the running process: the library never links a BLAS
// itself (LibTorch does), and without OpenBLAS these calls simply do not exist.
using SetFn = void (*)(int);
using GetFn = int (*)();

SetFn openblas_set() { return reinterpret_cast<SetFn>(::dlsym(RTLD_DEFAULT, "openblas_set_num_threads")); }
GetFn openblas_get() { return reinterpret_cast<GetFn>(::dlsym(RTLD_DEFAULT, "openblas_get_num_threads")); }

}  // namespace

ThreadSettings set_num_threads(int n) {
  if (n < 1) throw Error("set_num_threads: need at least 1 thread, got " + std::to_string(n));
  at::set_num_threads(n);
  if (const SetFn set = openblas_set()) set(n);
  return ThreadSettings{at::get_num_threads(), blas_num_threads()};
}

int blas_num_threads() {
  const GetFn get = openblas_get();
  return get ? get() : -1;
}

ScopedNumThreads::ScopedNumThreads(int n) : torch_threads_(at::get_num_threads()), blas_threads_(blas_num_threads()) {
  set_num_threads(n);
}

ScopedNumThreads::~ScopedNumThreads() {
  at::set_num_threads(torch_threads_);
  if (blas_threads_ > 0)
    if (const SetFn set = openblas_set()) set(blas_threads_);
}

}  // namespace mdd
