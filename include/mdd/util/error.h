#pragma once
/// \file
/// The single exception type thrown by mdd.

#include <stdexcept>
#include <string>

#include "mdd/export.h"

namespace mdd {

/// Every failure mdd reports (bad files, wrong shapes, unknown config keys, NaN losses, ...) is an
/// `mdd::Error`. The message names the file, key or shape at fault so users can act on it.
class MDD_API Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace mdd

/// `MDD_CHECK(cond, message)` throws `mdd::Error(message)` when `cond` is false. `message` (anything `mdd::Error` accepts,
/// typically a `fmt::format(...)` call) is evaluated only on failure, so checks on hot paths
/// (every forward call's shape checks) cost no string formatting when they pass.
#define MDD_CHECK(cond, ...)                   \
  do {                                         \
    if (!(cond)) throw ::mdd::Error(__VA_ARGS__); \
  } while (false)
