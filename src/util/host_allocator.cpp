#include "mdd/util/host_allocator.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <fmt/format.h>

namespace mdd {

HostAllocatorTuning tune_host_allocator(std::size_t mmap_threshold, std::size_t keep_bytes) {
  HostAllocatorTuning r;
  if (const char* env = std::getenv("MDD_HOST_ALLOCATOR"); env && std::strcmp(env, "default") == 0) {
    r.detail = "host allocator: left as it is (MDD_HOST_ALLOCATOR=default)";
    return r;
  }
#if defined(__GLIBC__)
  // Both settings are needed: a fixed mmap threshold alone still lets free() trim the heap top
  // (the same page faults), and a trim threshold alone switches off glibc's dynamic mmap
  // threshold, so every block >= 128 KiB would be mmap'ed again (measured: slower than default).
  // mallopt takes an int: at most 1 GiB each, and the message names what was really set.
  mmap_threshold = std::min<std::size_t>(mmap_threshold, std::size_t{1} << 30);
  keep_bytes = std::min<std::size_t>(keep_bytes, std::size_t{1} << 30);
  const bool mmap_ok = mallopt(M_MMAP_THRESHOLD, static_cast<int>(mmap_threshold)) == 1;
  const bool trim_ok = mallopt(M_TRIM_THRESHOLD, static_cast<int>(keep_bytes)) == 1;
  r.applied = mmap_ok && trim_ok;
  r.detail = r.applied ? fmt::format("host allocator: glibc malloc keeps freed memory (mmap threshold {} MiB, trim "
                                     "threshold {} MiB)",
                                     mmap_threshold >> 20, keep_bytes >> 20)
                       : "host allocator: glibc rejected the settings; left as it is";
#else
  (void)mmap_threshold;
  (void)keep_bytes;
  r.detail = "host allocator: not glibc; left as it is";
#endif
  return r;
}

}  // namespace mdd
