#pragma once
/// \file
/// Mixed precision: which floating-point type the DiT's matrix products run in.
///
/// mdd keeps master weights, optimizer state, EMA, the diffusion arithmetic and the minimax terms
/// in float32 and only lets the network's forward (and hence its backward) run under autocast in
/// a lower precision. `Precision::kAuto` picks bf16 where the hardware has fast bf16 kernels
/// (CPUs with AMX-BF16 or AVX512-BF16; CUDA GPUs of compute capability >= 8.0) and fp32 elsewhere.
#include <string>

#include <c10/core/Device.h>

#include "mdd/export.h"

namespace mdd {

/// The precision of a model's forward/backward.
enum class Precision {
  kFP32,  ///< everything in float32 (the reference)
  kBF16,  ///< bfloat16 autocast (CPU and CUDA)
  kFP16,  ///< float16 autocast with dynamic loss scaling (CUDA only)
  kAuto,  ///< bf16 where the device runs it fast, else fp32 (see `resolve_precision`)
};

/// "fp32", "bf16", "fp16", "auto".
MDD_API const char* precision_name(Precision p);
/// Inverse of `precision_name`; throws mdd::Error listing the valid names.
MDD_API Precision parse_precision(const std::string& name);

/// Whether this CPU has native bf16 matrix instructions (AMX-BF16 or AVX512-BF16), by CPUID.
MDD_API bool cpu_has_fast_bf16();

/// The concrete precision `p` means on `device`: kAuto -> kBF16 or kFP32 (see the file comment).
/// Throws mdd::Error for kFP16 on a CPU device (CPU fp16 matrix kernels are slower than fp32).
MDD_API Precision resolve_precision(Precision p, const c10::Device& device);

/// One line naming what runs, e.g. "bf16 autocast (cpu: AMX-BF16)" for logs and benchmark labels.
MDD_API std::string describe_precision(Precision resolved, const c10::Device& device);

/// RAII: enables autocast for `device`'s type in the resolved precision (kFP32: does nothing) and
/// restores the previous autocast state on destruction (clearing the weight-cast cache when the
/// outermost guard ends, as `torch.autocast.__exit__`). Thread-local, like autocast itself.
class MDD_API AutocastGuard {
 public:
  AutocastGuard(const c10::Device& device, Precision resolved);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool active_ = false;
  c10::DeviceType type_ = c10::DeviceType::CPU;
  bool prev_enabled_ = false;
  int prev_dtype_ = 0;  // at::ScalarType, kept as int to keep ATen's headers out of this one
};

}  // namespace mdd
