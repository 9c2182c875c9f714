#pragma once
/// \file
/// Progress reporting. The library never prints; long-running work reports through a callback.

#include <cstdint>
#include <functional>
#include <string>

#include "mdd/export.h"

namespace mdd {

/// One progress event: `step` of `total` units of the named `stage` are done.
struct MDD_API Progress {
  std::string stage;      ///< e.g. "finetune", "sample", "evaluate"
  int64_t step = 0;       ///< completed units
  int64_t total = 0;      ///< total units (0 = unknown)
  double elapsed_s = 0;   ///< seconds since the stage started
};

/// Receives progress events; an empty function means "no reporting".
using ProgressFn = std::function<void(const Progress&)>;

/// Receives one human-readable log line (no trailing newline), e.g. a checkpoint skipped on resume;
/// an empty function drops them.
using LogFn = std::function<void(const std::string&)>;

}  // namespace mdd
