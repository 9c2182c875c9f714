#include "mdd/io/input_limits.h"

#include <mutex>

#include "mdd/util/error.h"

namespace mdd {
namespace io {
namespace {

std::mutex& limits_mutex() {
  static std::mutex m;
  return m;
}

InputLimits& current() {
  static InputLimits limits;
  return limits;
}

}  // namespace

InputLimits input_limits() {
  std::lock_guard<std::mutex> lock(limits_mutex());
  return current();
}

void set_input_limits(const InputLimits& limits) {
  if (limits.max_expansion == 0 || limits.max_decoded_bytes == 0 || limits.max_image_pixels == 0 ||
      limits.max_tensor_elements == 0 || limits.max_view_expansion == 0)
    throw Error("set_input_limits: every limit must be positive");
  std::lock_guard<std::mutex> lock(limits_mutex());
  current() = limits;
}

}  // namespace io
}  // namespace mdd
