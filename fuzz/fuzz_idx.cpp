// Fashion-MNIST IDX files, gzipped or raw: the first input byte picks which of the two files of
// the test split is replaced by the rest of the input (the other one is a small valid file).
#include <zlib.h>

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <vector>

#include "fuzz_util.h"
#include "mdd/data/fashion_mnist.h"
#include "mdd/util/error.h"

namespace {

std::vector<uint8_t> gzip(const std::vector<uint8_t>& raw) {
  z_stream zs{};
  deflateInit2(&zs, 6, Z_DEFLATED, 16 + MAX_WBITS, 8, Z_DEFAULT_STRATEGY);
  std::vector<uint8_t> out(deflateBound(&zs, uLong(raw.size())) + 32);
  zs.next_in = const_cast<Bytef*>(raw.data());
  zs.avail_in = uInt(raw.size());
  zs.next_out = out.data();
  zs.avail_out = uInt(out.size());
  deflate(&zs, Z_FINISH);
  out.resize(zs.total_out);
  deflateEnd(&zs);
  return out;
}

// Two 28x28 images and two labels, valid IDX.
std::vector<uint8_t> images() {
  std::vector<uint8_t> v = {0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28};
  v.resize(v.size() + 2 * 784, 7);
  return gzip(v);
}
std::vector<uint8_t> labels() { return gzip({0, 0, 8, 1, 0, 0, 0, 2, 3, 9}); }

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::string dir = mdd_fuzz::scratch_dir() + "/idx";
  std::filesystem::create_directories(dir);
  static const auto img = images(), lbl = labels();
  const bool fuzz_images = data[0] & 1;
  const bool raw = data[0] & 2;  // fuzzed file stored without .gz
  const std::string img_name = "t10k-images-idx3-ubyte", lbl_name = "t10k-labels-idx1-ubyte";
  for (const auto& n : {img_name, lbl_name}) {
    std::filesystem::remove(dir + "/" + n);
    std::filesystem::remove(dir + "/" + n + ".gz");
  }
  const std::string fuzzed = (fuzz_images ? img_name : lbl_name) + (raw ? "" : ".gz");
  mdd_fuzz::write_file("idx/" + fuzzed, data + 1, size - 1);
  const auto& other = fuzz_images ? lbl : img;
  mdd_fuzz::write_file("idx/" + (fuzz_images ? lbl_name : img_name) + ".gz", other.data(), other.size());
  try {
    (void)mdd::load_fashion_mnist(dir, "test");
  } catch (const mdd::Error&) {
  }
  return 0;
}
