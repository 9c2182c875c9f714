#include "io/zip_reader.h"

#include <zlib.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include <fmt/format.h>

#include "mdd/io/input_limits.h"
#include "mdd/util/error.h"

namespace mdd {
namespace io {
namespace detail {
namespace {

constexpr uint32_t kLocalSig = 0x04034b50;
constexpr uint32_t kCentralSig = 0x02014b50;
constexpr uint32_t kEndSig = 0x06054b50;
constexpr uint32_t kEnd64Sig = 0x06064b50;
constexpr uint32_t kEnd64LocatorSig = 0x07064b50;
constexpr uint64_t kEndSize = 22, kEnd64LocatorSize = 20, kEnd64Size = 56, kCentralSize = 46, kLocalSize = 30;

uint16_t le16(const uint8_t* p) { return uint16_t(p[0] | (p[1] << 8)); }
uint32_t le32(const uint8_t* p) { return uint32_t(p[0]) | (uint32_t(p[1]) << 8) | (uint32_t(p[2]) << 16) | (uint32_t(p[3]) << 24); }
uint64_t le64(const uint8_t* p) { return uint64_t(le32(p)) | (uint64_t(le32(p + 4)) << 32); }

}  // namespace

uint32_t crc32_of(const uint8_t* data, uint64_t size) {
  uLong crc = ::crc32(0L, Z_NULL, 0);
  while (size > 0) {
    const uInt chunk = uInt(std::min<uint64_t>(size, uint64_t(1) << 30));
    crc = ::crc32(crc, data, chunk);
    data += chunk;
    size -= chunk;
  }
  return uint32_t(crc);
}

ZipReader::ZipReader(torch::Tensor bytes, std::string what) : bytes_(std::move(bytes)), what_(std::move(what)) {
  TORCH_CHECK(bytes_.dim() == 1 && bytes_.scalar_type() == torch::kByte && bytes_.is_contiguous(), "ZipReader wants 1-D uint8 bytes");
  base_ = bytes_.data_ptr<uint8_t>();
  size_ = uint64_t(bytes_.numel());
  if (size_ < kEndSize) throw Error(fmt::format("{}: not a zip archive ({} bytes is too short; truncated?)", what_, size_));
  const InputLimits limits = input_limits();

  // The end-of-central-directory record sits in the last 22 + (comment <= 65535) bytes.
  uint64_t eocd = std::numeric_limits<uint64_t>::max();
  const uint64_t lowest = size_ - kEndSize > 65535 ? size_ - kEndSize - 65535 : 0;
  for (uint64_t p = size_ - kEndSize + 1; p-- > lowest;) {
    if (le32(base_ + p) == kEndSig && p + kEndSize + le16(base_ + p + 20) <= size_) {
      eocd = p;
      break;
    }
  }
  if (eocd == std::numeric_limits<uint64_t>::max())
    throw Error(fmt::format("{}: zip end-of-central-directory record not found (file truncated or not a zip archive)", what_));
  const uint8_t* e = base_ + eocd;
  uint64_t count = le16(e + 10);
  uint64_t cd_size = le32(e + 12);
  uint64_t cd_offset = le32(e + 16);
  if (le16(e + 4) != 0 || le16(e + 6) != 0) throw Error(fmt::format("{}: multi-disk zip archives are not supported", what_));
  uint64_t cd_limit = eocd;  // the central directory must end before the record that describes it
  if (count == 0xFFFF || cd_size == 0xFFFFFFFF || cd_offset == 0xFFFFFFFF) {
    // ZIP64: the real values live in the zip64 end record found through its locator.
    if (eocd < kEnd64LocatorSize || le32(base_ + eocd - kEnd64LocatorSize) != kEnd64LocatorSig)
      throw Error(fmt::format("{}: zip64 end-of-central-directory locator missing (corrupt archive)", what_));
    const uint64_t z64 = le64(base_ + eocd - kEnd64LocatorSize + 8);
    if (z64 > eocd - kEnd64LocatorSize || eocd - kEnd64LocatorSize - z64 < kEnd64Size || le32(base_ + z64) != kEnd64Sig)
      throw Error(fmt::format("{}: zip64 end-of-central-directory record at offset {} is invalid", what_, z64));
    count = le64(base_ + z64 + 32);
    cd_size = le64(base_ + z64 + 40);
    cd_offset = le64(base_ + z64 + 48);
    cd_limit = z64;
  }
  if (cd_offset > cd_limit || cd_size > cd_limit - cd_offset)
    throw Error(fmt::format("{}: zip central directory [{}, +{}) lies outside the file (truncated or corrupt)", what_, cd_offset, cd_size));
  if (count > cd_size / kCentralSize)
    throw Error(fmt::format("{}: zip central directory claims {} entries but holds only {} bytes", what_, count, cd_size));

  uint64_t p = cd_offset;
  const uint64_t cd_end = cd_offset + cd_size;
  for (uint64_t i = 0; i < count; ++i) {
    if (cd_end - p < kCentralSize || le32(base_ + p) != kCentralSig)
      throw Error(fmt::format("{}: zip central directory entry {} at offset {} is corrupt", what_, i, p));
    const uint8_t* c = base_ + p;
    const uint16_t flags = le16(c + 8);
    ZipEntry entry;
    entry.method = le16(c + 10);
    entry.crc32 = le32(c + 16);
    entry.compressed_size = le32(c + 20);
    entry.size = le32(c + 24);
    const uint64_t name_len = le16(c + 28), extra_len = le16(c + 30), comment_len = le16(c + 32);
    uint64_t local = le32(c + 42);
    if (cd_end - p - kCentralSize < name_len + extra_len + comment_len)
      throw Error(fmt::format("{}: zip central directory entry {} runs past the directory", what_, i));
    entry.name.assign(reinterpret_cast<const char*>(c + kCentralSize), name_len);
    // ZIP64 extended information: 8-byte values for exactly the fields that hold 0xFFFFFFFF, in order.
    const uint8_t* x = c + kCentralSize + name_len;
    for (uint64_t q = 0; q + 4 <= extra_len;) {
      const uint16_t id = le16(x + q), len = le16(x + q + 2);
      if (q + 4 + len > extra_len) throw Error(fmt::format("{}: zip entry '{}' has a malformed extra field", what_, entry.name));
      if (id == 0x0001) {
        const uint8_t* f = x + q + 4;
        uint64_t left = len;
        auto take = [&](uint64_t& v) {
          if (left < 8) throw Error(fmt::format("{}: zip entry '{}' has a truncated zip64 extra field", what_, entry.name));
          v = le64(f);
          f += 8;
          left -= 8;
        };
        if (entry.size == 0xFFFFFFFF) take(entry.size);
        if (entry.compressed_size == 0xFFFFFFFF) take(entry.compressed_size);
        if (local == 0xFFFFFFFF) take(local);
      }
      q += 4 + len;
    }
    if (flags & 0x1) throw Error(fmt::format("{}: zip entry '{}' is encrypted", what_, entry.name));
    if (entry.method != 0 && entry.method != 8)
      throw Error(fmt::format("{}: zip entry '{}' uses compression method {} (only STORED and DEFLATED are supported)", what_,
                              entry.name, entry.method));
    if (entry.method == 0 && entry.compressed_size != entry.size)
      throw Error(fmt::format("{}: zip entry '{}' is STORED but its sizes differ ({} vs {})", what_, entry.name,
                              entry.compressed_size, entry.size));
    // Checked against the input budget before anything is allocated: DEFLATE cannot expand by more
    // than ~1032:1, so a larger claimed size is a corrupt or hostile header (a "zip bomb").
    if (entry.method == 8 && entry.size / limits.max_expansion > entry.compressed_size + 1)
      throw Error(fmt::format("{}: zip entry '{}' claims {} bytes from {} compressed bytes (more than the {}:1 expansion "
                              "allowed; DEFLATE cannot exceed ~1032:1)", what_, entry.name, entry.size,
                              entry.compressed_size, limits.max_expansion));
    if (entry.method == 8 && entry.size > limits.max_decoded_bytes)
      throw Error(fmt::format("{}: zip entry '{}' would inflate to {} bytes, more than the {} allowed "
                              "(mdd::io::InputLimits::max_decoded_bytes)", what_, entry.name, entry.size,
                              limits.max_decoded_bytes));
    // Local header: its own name/extra lengths decide where the data starts.
    if (local > cd_offset || cd_offset - local < kLocalSize || le32(base_ + local) != kLocalSig)
      throw Error(fmt::format("{}: zip local header of '{}' at offset {} is missing or corrupt", what_, entry.name, local));
    const uint64_t lname = le16(base_ + local + 26), lextra = le16(base_ + local + 28);
    const uint64_t data = local + kLocalSize + lname + lextra;
    if (data > cd_offset || entry.compressed_size > cd_offset - data)
      throw Error(fmt::format("{}: zip entry '{}' data [{}, +{}) runs past the end of the archive data (truncated?)", what_,
                              entry.name, data, entry.compressed_size));
    if (lname != name_len || std::memcmp(base_ + local + kLocalSize, entry.name.data(), name_len) != 0)
      throw Error(fmt::format("{}: zip local header name of '{}' does not match the central directory", what_, entry.name));
    entry.data_offset = data;
    std::string name = entry.name;
    if (!entries_.emplace(name, std::move(entry)).second)
      throw Error(fmt::format("{}: zip archive has two entries called '{}'", what_, name));
    p += kCentralSize + name_len + extra_len + comment_len;
  }
}

const ZipEntry* ZipReader::find(const std::string& name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second;
}

torch::Tensor ZipReader::read(const ZipEntry& entry, bool verify_crc) const {
  const uint8_t* src = base_ + entry.data_offset;
  torch::Tensor out;
  if (entry.method == 0) {
    out = bytes_.narrow(0, int64_t(entry.data_offset), int64_t(entry.size));
  } else {
    out = torch::empty({int64_t(entry.size)}, torch::kByte);
    z_stream zs{};
    if (inflateInit2(&zs, -MAX_WBITS) != Z_OK) throw Error(fmt::format("{}: zlib inflateInit2 failed", what_));
    uint64_t in_left = entry.compressed_size, out_left = entry.size;
    zs.next_in = const_cast<Bytef*>(src);
    zs.next_out = out.data_ptr<uint8_t>();
    uint8_t spare = 0;  // once the declared size is reached, any further output lands here = corrupt
    bool overrun = false;
    int rc = Z_OK;
    while (rc == Z_OK && !overrun) {
      // zlib counts in 32-bit uInt: feed large members in slices.
      const uInt in_chunk = uInt(std::min<uint64_t>(in_left, 1u << 30));
      const bool at_end = out_left == 0;
      if (at_end) zs.next_out = &spare;
      const uInt out_chunk = at_end ? 1u : uInt(std::min<uint64_t>(out_left, 1u << 30));
      zs.avail_in = in_chunk;
      zs.avail_out = out_chunk;
      rc = inflate(&zs, Z_NO_FLUSH);
      in_left -= in_chunk - zs.avail_in;
      if (at_end) overrun = zs.avail_out == 0;
      else out_left -= out_chunk - zs.avail_out;
      if (rc == Z_OK && zs.avail_in == in_chunk && zs.avail_out == out_chunk) rc = Z_BUF_ERROR;  // no progress
    }
    inflateEnd(&zs);
    if (rc != Z_STREAM_END || out_left != 0 || overrun)
      throw Error(fmt::format("{}: zip entry '{}' does not inflate to its declared {} bytes (corrupt data)", what_, entry.name,
                              entry.size));
  }
  if (verify_crc && crc32_of(out.data_ptr<uint8_t>(), entry.size) != entry.crc32)
    throw Error(fmt::format("{}: zip entry '{}' fails its CRC-32 check (corrupt data)", what_, entry.name));
  return out;
}

}  // namespace detail
}  // namespace io
}  // namespace mdd
