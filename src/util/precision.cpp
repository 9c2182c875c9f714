#include "mdd/util/precision.h"

#include <ATen/detail/CUDAHooksInterface.h>

#include "mdd/util/error.h"
#include "util/torch_compat.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace mdd {
namespace {

struct CpuBf16 {
  bool amx = false, avx512 = false;
};

CpuBf16 probe_cpu() {
  CpuBf16 r;
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_max(0, nullptr) >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    r.amx = (d >> 22) & 1u;  // AMX-BF16
    __cpuid_count(7, 1, a, b, c, d);
    r.avx512 = (a >> 5) & 1u;  // AVX512_BF16
  }
#endif
  return r;
}

const CpuBf16& cpu() {
  static const CpuBf16 r = probe_cpu();
  return r;
}

bool cuda_has_fast_bf16() {
  // Ampere (sm_80) and later; the CUDA hooks answer without CUDA headers in this build.
  return at::detail::getCUDAHooks().hasCUDA() && at::detail::getCUDAHooks().supportsBFloat16ConvolutionWithCuDNNv8();
}

}  // namespace

const char* precision_name(Precision p) {
  switch (p) {
    case Precision::kFP32: return "fp32";
    case Precision::kBF16: return "bf16";
    case Precision::kFP16: return "fp16";
    case Precision::kAuto: return "auto";
  }
  return "?";
}

Precision parse_precision(const std::string& name) {
  for (Precision p : {Precision::kFP32, Precision::kBF16, Precision::kFP16, Precision::kAuto})
    if (name == precision_name(p)) return p;
  throw Error("precision \"" + name + "\": expected one of fp32, bf16, fp16, auto");
}

bool cpu_has_fast_bf16() { return cpu().amx || cpu().avx512; }

Precision resolve_precision(Precision p, const c10::Device& device) {
  const bool is_cuda = device.is_cuda();
  if (p == Precision::kAuto) {
    const bool fast = is_cuda ? cuda_has_fast_bf16() : (device.is_cpu() && cpu_has_fast_bf16());
    return fast ? Precision::kBF16 : Precision::kFP32;
  }
  if (p == Precision::kFP16 && !is_cuda)
    throw Error("precision fp16 needs a CUDA device (CPU fp16 matrix kernels are slower than fp32); use bf16 or auto");
  if (p != Precision::kFP32 && !is_cuda && !device.is_cpu())
    throw Error(std::string("precision ") + precision_name(p) + " is supported on CPU and CUDA devices only");
  return p;
}

std::string describe_precision(Precision resolved, const c10::Device& device) {
  if (resolved == Precision::kFP32) return "fp32";
  std::string s = std::string(precision_name(resolved)) + " autocast (" + (device.is_cuda() ? "cuda" : "cpu");
  if (device.is_cpu())
    s += cpu().amx ? ": AMX-BF16" : cpu().avx512 ? ": AVX512-BF16" : ": no native bf16, emulated";
  return s + ")";
}

AutocastGuard::AutocastGuard(const c10::Device& device, Precision resolved) {
  if (resolved == Precision::kFP32) return;
  if (resolved == Precision::kAuto) throw Error("AutocastGuard: resolve the precision first (resolve_precision)");
  type_ = device.type();
  prev_enabled_ = compat::autocast_enabled(type_);
  prev_dtype_ = static_cast<int>(compat::autocast_dtype(type_));
  compat::set_autocast(type_, true, resolved == Precision::kBF16 ? at::kBFloat16 : at::kHalf);
  at::autocast::increment_nesting();
  active_ = true;
}

AutocastGuard::~AutocastGuard() {
  if (!active_) return;
  // Weights cast inside the region are cached until the outermost region ends (torch.autocast).
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  compat::set_autocast(type_, prev_enabled_, static_cast<at::ScalarType>(prev_dtype_));
}

}  // namespace mdd
