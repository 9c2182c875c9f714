#pragma once
// FNV-1a (64-bit): a hash that is the same in every process, build and platform (std::hash need not
// be), for names and keys that several processes or later runs must agree on. Internal.
#include <cstdint>
#include <string_view>

namespace mdd {
inline uint64_t fnv1a64(std::string_view s, uint64_t h = 0xCBF29CE484222325ull) {
  for (unsigned char c : s) h = (h ^ c) * 0x100000001B3ull;
  return h;
}
}  // namespace mdd
