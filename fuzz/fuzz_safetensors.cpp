// safetensors: header length, JSON header, dtypes, shapes, offsets, widened dtypes.
#include <cstddef>
#include <cstdint>

#include "mdd/io/safetensors.h"
#include "mdd/util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto st = mdd::io::parse_safetensors(data, size, "fuzz.safetensors");
    for (auto& kv : st.tensors) (void)kv.second.sum();  // touch every element
  } catch (const mdd::Error&) {
  }
  return 0;
}
