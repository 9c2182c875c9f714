#pragma once
/// \file
/// Intra-op threads for LibTorch *and* the BLAS library under it.
///
/// `torch::set_num_threads` sets LibTorch's OpenMP pool, but LibTorch builds that call a system BLAS
/// (Debian's LibTorch calls OpenBLAS through libblas.so.3) leave that library's own thread pool
/// alone: OpenBLAS then runs every matrix product on all cores. Two things follow. Several ranks on
/// one machine oversubscribe the cores (2 processes x 1 torch thread still run 2 BLAS threads each).
/// And results depend on the environment: OpenBLAS splits a product differently with 1 or 2 threads
/// on some CPUs (seen on an AMD EPYC: sampled latents 7.6e-5 apart between a process that inherited
/// OMP_NUM_THREADS=1 and one that did not), so ranks that should compute bit-identical batches did not.

#include "mdd/export.h"

namespace mdd {

/// What `set_num_threads` set.
struct MDD_API ThreadSettings {
  int torch_threads = 0;  ///< LibTorch's intra-op threads after the call
  int blas_threads = -1;  ///< the BLAS library's threads after the call; -1 = it exposes no control (MKL
                          ///< and oneDNN follow LibTorch's setting; other BLAS libraries are left alone)
};

/// Sets LibTorch's intra-op threads to `n` (>= 1, else mdd::Error) and, where the process runs
/// OpenBLAS (found at run time, no link dependency), OpenBLAS's threads too.
MDD_API ThreadSettings set_num_threads(int n);

/// OpenBLAS's current thread count in this process, or -1 where OpenBLAS is not loaded.
MDD_API int blas_num_threads();

/// Sets the threads as `set_num_threads(n)` for the lifetime of the object and restores LibTorch's
/// and OpenBLAS's previous counts when it ends. For a rank that works alone while the other ranks on
/// its machine wait (their cores are idle then): it borrows their threads for that job only.
class MDD_API ScopedNumThreads {
 public:
  explicit ScopedNumThreads(int n);
  ~ScopedNumThreads();
  ScopedNumThreads(const ScopedNumThreads&) = delete;
  ScopedNumThreads& operator=(const ScopedNumThreads&) = delete;

 private:
  int torch_threads_ = 0;
  int blas_threads_ = -1;
};

}  // namespace mdd
