// torch.save archives: zip + the restricted unpickler + storage records + views, through the
// public loaders (the same file is read as a plain state_dict and with each entry rule).
#include <cstddef>
#include <cstdint>

#include "fuzz_util.h"
#include "mdd/io/torch_checkpoint.h"
#include "mdd/util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = mdd_fuzz::write_file("input.pt", data, size);
  for (const char* entry : {"", "ema"}) {
    try {
      auto t = mdd::io::load_torch_checkpoint(path, entry);
      for (auto& kv : t) (void)kv.second.contiguous();  // materialise views
    } catch (const mdd::Error&) {
    }
  }
  try {
    (void)mdd::io::load_weights(path);
  } catch (const mdd::Error&) {
  }
  return 0;
}
