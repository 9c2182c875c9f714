#pragma once
// Every difference between the LibTorch versions mdd builds against (Debian's 1.13 and 2.x) lives
// here, so the rest of the code never tests TORCH_VERSION itself. Not installed.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <torch/version.h>

namespace mdd {
namespace compat {

#define MDD_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) || (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))

/// Whether `at::scaled_dot_product_attention` (fused attention, LibTorch >= 2.0) exists.
constexpr bool kHasSdpa = MDD_TORCH_AT_LEAST(2, 0);

/// softmax(q k^T / sqrt(d)) v through the fused kernel; only call when `kHasSdpa` (callers keep
/// their explicit path for 1.13 in the `else` branch of an `if constexpr`).
inline at::Tensor sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
#if MDD_TORCH_AT_LEAST(2, 0)
  return at::scaled_dot_product_attention(q, k, v);
#else
  (void)k;
  (void)v;
  TORCH_CHECK(false, "scaled_dot_product_attention needs LibTorch >= 2.0");
  return q;
#endif
}

// Autocast state per device type. 2.4 replaced the per-device functions (set_cpu_enabled,
// set_autocast_cpu_dtype, set_enabled for CUDA, ...) by ones taking a DeviceType.
inline bool autocast_enabled(c10::DeviceType type) {
#if MDD_TORCH_AT_LEAST(2, 4)
  return at::autocast::is_autocast_enabled(type);
#else
  return type == c10::DeviceType::CPU ? at::autocast::is_cpu_enabled() : at::autocast::is_enabled();
#endif
}

inline at::ScalarType autocast_dtype(c10::DeviceType type) {
#if MDD_TORCH_AT_LEAST(2, 4)
  return at::autocast::get_autocast_dtype(type);
#else
  return type == c10::DeviceType::CPU ? at::autocast::get_autocast_cpu_dtype() : at::autocast::get_autocast_gpu_dtype();
#endif
}

inline void set_autocast(c10::DeviceType type, bool enabled, at::ScalarType dtype) {
#if MDD_TORCH_AT_LEAST(2, 4)
  at::autocast::set_autocast_dtype(type, dtype);
  at::autocast::set_autocast_enabled(type, enabled);
#else
  if (type == c10::DeviceType::CPU) {
    at::autocast::set_autocast_cpu_dtype(dtype);
    at::autocast::set_cpu_enabled(enabled);
  } else {
    at::autocast::set_autocast_gpu_dtype(dtype);
    at::autocast::set_enabled(enabled);
  }
#endif
}

}  // namespace compat
}  // namespace mdd
