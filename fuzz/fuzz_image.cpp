// Image decoding (PNG and JPEG only) and the preprocessing every loaded image goes through.
#include <cstddef>
#include <cstdint>

#include "mdd/io/image.h"
#include "mdd/util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  for (int64_t channels : {3, 1}) {
    try {
      auto img = mdd::decode_image(data, size, channels, "fuzz.img");
      (void)mdd::center_crop_arr(img, 32);
      (void)mdd::center_crop(mdd::resize_shorter(img, 24), 24);
    } catch (const mdd::Error&) {
    }
  }
  return 0;
}
