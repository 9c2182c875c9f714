// Training-checkpoint sidecars: a valid weights file beside a fuzzed JSON sidecar, read the way
// a trainer resumes (newest first, falling back, logging every skip).
#include <cstddef>
#include <cstdint>
#include <filesystem>

#include <torch/torch.h>

#include "fuzz_util.h"
#include "mdd/train/checkpoint.h"
#include "mdd/util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = [] {
    const std::string d = mdd_fuzz::scratch_dir() + "/ckpt";
    mdd::write_checkpoint(d, 1, {{"x", torch::ones({3})}});
    mdd::write_checkpoint(d, 2, {{"x", torch::zeros({3})}});
    return d;
  }();
  mdd_fuzz::write_file("ckpt/0000002.json", data, size);
  try {
    auto ck = mdd::open_checkpoint_for_resume(dir, [](const std::string&) {});
    if (!ck) std::abort();  // step 1 is intact: there is always something to resume
  } catch (const mdd::Error&) {
  }
  return 0;
}
