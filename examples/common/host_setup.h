#pragma once
// Shared start-up step of the example programs (not part of the library): keep freed memory in the
// process (mdd/util/host_allocator.h; docs/performance.md: page faults were a quarter of a small
// model's forward) and say on stderr what was set.
#include <cstdio>

#include "mdd/util/host_allocator.h"

namespace mdd_examples {

/// Call before the first large tensor.
inline void tune_host_allocator() { std::fprintf(stderr, "%s\n", mdd::tune_host_allocator().detail.c_str()); }

}  // namespace mdd_examples
