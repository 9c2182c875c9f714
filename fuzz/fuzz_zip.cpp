// The zip reader alone: end records, zip64, central directory, local headers, DEFLATE, CRC.
#include <cstddef>
#include <cstdint>
#include <cstring>

#include <torch/types.h>

#include "io/zip_reader.h"
#include "mdd/util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto bytes = torch::empty({int64_t(size)}, torch::kByte);
  if (size) std::memcpy(bytes.data_ptr(), data, size);
  try {
    mdd::io::detail::ZipReader zip(bytes, "fuzz.zip");
    for (const auto& kv : zip.entries()) {
      try {
        (void)zip.read(kv.second);
      } catch (const mdd::Error&) {
      }
    }
  } catch (const mdd::Error&) {
  }
  return 0;
}
