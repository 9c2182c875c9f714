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
