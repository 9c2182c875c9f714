#pragma once
/// \file
/// Host-memory allocator settings for processes that run mdd's CPU workloads.
///
/// glibc returns large freed blocks to the kernel at once: blocks from 128 KiB up are mmap'ed and
/// unmapped on free, and the heap top is trimmed above 128 KiB, so every step of an eager model
/// asks the kernel for fresh zeroed pages again. For the small DiTs mdd trains on the CPU those
/// page faults are a large share of the time (the Fashion-MNIST DiT forward at batch 200: 140-156
/// ms with the settings below against 187-235 ms without, docs/performance.md). The library never
/// changes process-wide state by itself: programs call `tune_host_allocator` once at start (the
/// bundled ones do), applications that link mdd decide for themselves.

#include <cstddef>
#include <string>

#include "mdd/export.h"

namespace mdd {

/// What `tune_host_allocator` did.
struct MDD_API HostAllocatorTuning {
  bool applied = false;  ///< the settings are in force
  std::string detail;    ///< one line for a log: what was set, or why nothing was
};

/// Keeps freed host memory inside the process: blocks below `mmap_threshold` come from the heap,
/// and up to `keep_bytes` of free heap top stays mapped instead of being returned to the kernel.
/// The price is a resident size that stays near the peak working set. Only glibc's malloc is
/// tuned (elsewhere nothing happens and `detail` says so); setting the environment variable
/// `MDD_HOST_ALLOCATOR=default` turns it off (e.g. with jemalloc or tcmalloc preloaded).
/// Each value is capped at 1 GiB (mallopt takes an int). Call it before the first large
/// allocation; calling it again is harmless.
MDD_API HostAllocatorTuning tune_host_allocator(std::size_t mmap_threshold = std::size_t{256} << 20,
                                                std::size_t keep_bytes = std::size_t{1} << 30);

}  // namespace mdd
