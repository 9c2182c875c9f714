#include "mdd/data/fashion_mnist.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include <fmt/format.h>
#include <zlib.h>

#include "mdd/io/input_limits.h"
#include "mdd/util/error.h"
#include "util/file_util.h"

namespace mdd {
namespace {

const std::vector<std::string> kClassNames = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                              "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};

bool file_exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// Inflates every gzip member of `gz`; Z_STREAM_END of each member means its CRC-32 and length
// trailer were verified by zlib, so truncated or corrupted files are detected here.
std::vector<uint8_t> gunzip(const torch::Tensor& gz, const std::string& path) {
  const auto* in = gz.data_ptr<uint8_t>();
  const size_t in_size = size_t(gz.numel());
  if (in_size < 18 || in[0] != 0x1f || in[1] != 0x8b) throw Error(fmt::format("{}: not a gzip file", path));
  std::vector<uint8_t> out;
  // The output is bounded by the input budget, never by the file's own claims: ISIZE (the size mod
  // 2^32 of the last member) is only a first guess for the buffer, capped by that bound.
  const io::InputLimits limits = io::input_limits();
  const uint64_t bound = std::min<uint64_t>(limits.max_decoded_bytes,
                                            uint64_t(in_size) > UINT64_MAX / limits.max_expansion
                                                ? UINT64_MAX
                                                : uint64_t(in_size) * limits.max_expansion);
  uint32_t isize = 0;
  std::memcpy(&isize, in + in_size - 4, 4);
  out.reserve(size_t(std::min<uint64_t>({isize, bound, uint64_t(1) << 30})));
  if (in_size > std::numeric_limits<uInt>::max()) throw Error(fmt::format("{}: file too large", path));
  z_stream zs{};
  if (inflateInit2(&zs, 16 + MAX_WBITS) != Z_OK) throw Error(fmt::format("{}: zlib init failed", path));
  zs.next_in = const_cast<Bytef*>(in);
  zs.avail_in = uInt(in_size);
  std::vector<uint8_t> chunk(size_t(1) << 16);
  for (;;) {
    zs.next_out = chunk.data();
    zs.avail_out = uInt(chunk.size());
    const int ret = inflate(&zs, Z_NO_FLUSH);
    const size_t produced = chunk.size() - zs.avail_out;
    if (uint64_t(out.size()) + produced > bound) {
      inflateEnd(&zs);
      throw Error(fmt::format("{}: inflates to more than {} bytes ({}:1 expansion / mdd::io::InputLimits); "
                              "not a Fashion-MNIST file", path, bound, limits.max_expansion));
    }
    out.insert(out.end(), chunk.data(), chunk.data() + produced);
    if (ret == Z_STREAM_END) {
      if (zs.avail_in == 0) break;
      inflateReset(&zs);  // another gzip member follows
      continue;
    }
    if (ret == Z_OK) continue;
    const std::string msg = zs.msg ? zs.msg : "error " + std::to_string(ret);
    inflateEnd(&zs);
    if (ret == Z_BUF_ERROR)  // no progress possible: the input ended inside the stream
      throw Error(fmt::format("{}: truncated gzip file (data ends before the gzip trailer)", path));
    throw Error(fmt::format("{}: corrupt gzip data ({})", path, msg));
  }
  inflateEnd(&zs);
  return out;
}

uint32_t be32(const uint8_t* p) { return uint32_t(p[0]) << 24 | uint32_t(p[1]) << 16 | uint32_t(p[2]) << 8 | p[3]; }

// Reads `<dir>/<name>.gz`, or the uncompressed `<dir>/<name>` when only that exists.
std::pair<std::vector<uint8_t>, std::string> read_idx(const std::string& dir, const std::string& name) {
  const std::string gz = dir + "/" + name + ".gz";
  const std::string raw = dir + "/" + name;
  if (!file_exists(gz) && file_exists(raw)) {
    const torch::Tensor bytes = read_file_bytes(raw);
    const auto* p = bytes.data_ptr<uint8_t>();
    return {std::vector<uint8_t>(p, p + bytes.numel()), raw};
  }
  const torch::Tensor bytes = read_file_bytes(gz);  // throws naming the file when missing
  return {gunzip(bytes, gz), gz};
}

}  // namespace

LabeledImages load_fashion_mnist(const std::string& dir, const std::string& split) {
  std::string prefix;
  if (split == "train") prefix = "train";
  else if (split == "test" || split == "t10k") prefix = "t10k";
  else throw Error(fmt::format("load_fashion_mnist: split must be \"train\" or \"test\", got \"{}\"", split));

  const auto [img_bytes, img_path] = read_idx(dir, prefix + "-images-idx3-ubyte");
  const auto [lbl_bytes, lbl_path] = read_idx(dir, prefix + "-labels-idx1-ubyte");

  if (img_bytes.size() < 16) throw Error(fmt::format("{}: IDX header truncated ({} bytes)", img_path, img_bytes.size()));
  const uint32_t img_magic = be32(img_bytes.data());
  if (img_magic != 2051)
    throw Error(fmt::format("{}: bad IDX magic {} (expected 2051 = uint8 images, 3 dims)", img_path, img_magic));
  const int64_t n = be32(img_bytes.data() + 4), rows = be32(img_bytes.data() + 8), cols = be32(img_bytes.data() + 12);
  if (rows <= 0 || cols <= 0 || rows > 4096 || cols > 4096)
    throw Error(fmt::format("{}: implausible image size {}x{}", img_path, rows, cols));
  const uint64_t expect_img = 16 + uint64_t(n) * uint64_t(rows) * uint64_t(cols);
  if (img_bytes.size() != expect_img)
    throw Error(fmt::format("{}: {} bytes of data, header ({} images of {}x{}) needs {}", img_path, img_bytes.size(), n,
                            rows, cols, expect_img));

  if (lbl_bytes.size() < 8) throw Error(fmt::format("{}: IDX header truncated ({} bytes)", lbl_path, lbl_bytes.size()));
  const uint32_t lbl_magic = be32(lbl_bytes.data());
  if (lbl_magic != 2049)
    throw Error(fmt::format("{}: bad IDX magic {} (expected 2049 = uint8 labels, 1 dim)", lbl_path, lbl_magic));
  const int64_t nl = be32(lbl_bytes.data() + 4);
  if (nl != n) throw Error(fmt::format("{}: {} labels but {} has {} images", lbl_path, nl, img_path, n));
  if (lbl_bytes.size() != 8 + uint64_t(nl))
    throw Error(fmt::format("{}: {} bytes of data, header ({} labels) needs {}", lbl_path, lbl_bytes.size(), nl, 8 + nl));

  LabeledImages out;
  out.class_names = kClassNames;
  out.images = torch::empty({n, rows, cols, 1}, torch::kUInt8);
  std::memcpy(out.images.data_ptr<uint8_t>(), img_bytes.data() + 16, size_t(n * rows * cols));
  out.labels = torch::empty({n}, torch::kInt64);
  auto* l = out.labels.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t v = lbl_bytes[size_t(8 + i)];
    if (v >= kClassNames.size())
      throw Error(fmt::format("{}: label {} of item {} is outside 0..{}", lbl_path, int(v), i, kClassNames.size() - 1));
    l[i] = v;
  }
  return out;
}

const std::vector<std::string>& fashion_mnist_class_names() { return kClassNames; }

}  // namespace mdd
