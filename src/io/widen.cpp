#include "io/widen.h"

#include <cmath>
#include <cstring>
#include <limits>

#include <fmt/format.h>

#include "mdd/util/error.h"

namespace mdd {
namespace io {
namespace detail {
namespace {

// Decodes one OCP float8 value (E4M3FN: bias 7, no infinities, S.1111.111 = NaN; E5M2: bias 15, IEEE-like).
float decode_f8(uint8_t v, bool e4m3) {
  const int sign = (v & 0x80) ? -1 : 1;
  const int mbits = e4m3 ? 3 : 2;
  const int bias = e4m3 ? 7 : 15;
  const int emax = e4m3 ? 15 : 31;
  const int e = (v & 0x7F) >> mbits;
  const int m = v & ((1 << mbits) - 1);
  if (e4m3 && e == emax && m == (1 << mbits) - 1) return std::numeric_limits<float>::quiet_NaN();
  if (!e4m3 && e == emax) return m ? std::numeric_limits<float>::quiet_NaN() : sign * std::numeric_limits<float>::infinity();
  if (e == 0) return sign * std::ldexp(float(m), 1 - bias - mbits);
  return sign * std::ldexp(float(m + (1 << mbits)), e - bias - mbits);
}

}  // namespace

size_t widened_size(const std::string& name) {
  if (name == "U16") return 2;
  if (name == "U32") return 4;
  if (name == "U64") return 8;
  if (name == "F8_E4M3" || name == "F8_E5M2") return 1;
  return 0;
}

torch::Tensor decode_widened(const std::string& dt, const uint8_t* p, int64_t n, const std::vector<int64_t>& shape,
                             const std::string& what, const std::string& key) {
  if (dt == "F8_E4M3" || dt == "F8_E5M2") {
    auto out = torch::empty({n}, torch::kFloat);
    float* o = out.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) o[i] = decode_f8(p[i], dt == "F8_E4M3");
    return out.view(shape);
  }
  if (dt == "U16" || dt == "U32") {
    auto out = torch::empty({n}, dt == "U16" ? torch::kInt : torch::kLong);
    for (int64_t i = 0; i < n; ++i) {
      if (dt == "U16") { uint16_t v; std::memcpy(&v, p + 2 * i, 2); out.data_ptr<int32_t>()[i] = v; }
      else { uint32_t v; std::memcpy(&v, p + 4 * i, 4); out.data_ptr<int64_t>()[i] = v; }
    }
    return out.view(shape);
  }
  if (dt != "U64") throw Error(fmt::format("{}: tensor '{}' has unsupported element type {}", what, key, dt));
  auto out = torch::empty({n}, torch::kLong);
  for (int64_t i = 0; i < n; ++i) {
    uint64_t v; std::memcpy(&v, p + 8 * i, 8);
    if (v > uint64_t(std::numeric_limits<int64_t>::max()))
      throw Error(fmt::format("{}: tensor '{}' (U64) holds {} which does not fit int64", what, key, v));
    out.data_ptr<int64_t>()[i] = int64_t(v);
  }
  return out.view(shape);
}

bool torch_dtype_by_name(const std::string& q, torch::ScalarType* native, std::string* widened) {
  static const std::pair<const char*, torch::ScalarType> kNative[] = {
      {"torch.float32", torch::kFloat},   {"torch.float64", torch::kDouble},  {"torch.float16", torch::kHalf},
      {"torch.bfloat16", torch::kBFloat16}, {"torch.int8", torch::kChar},     {"torch.int16", torch::kShort},
      {"torch.int32", torch::kInt},       {"torch.int64", torch::kLong},      {"torch.uint8", torch::kByte},
      {"torch.bool", torch::kBool},       {"torch.complex64", torch::kComplexFloat},
      {"torch.complex128", torch::kComplexDouble},
  };
  static const std::pair<const char*, const char*> kWidened[] = {
      {"torch.uint16", "U16"}, {"torch.uint32", "U32"}, {"torch.uint64", "U64"},
      {"torch.float8_e4m3fn", "F8_E4M3"}, {"torch.float8_e5m2", "F8_E5M2"},
  };
  for (const auto& d : kNative)
    if (q == d.first) {
      *native = d.second;
      widened->clear();
      return true;
    }
  for (const auto& d : kWidened)
    if (q == d.first) {
      *widened = d.second;
      return true;
    }
  return false;
}

}  // namespace detail
}  // namespace io
}  // namespace mdd
