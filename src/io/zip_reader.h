#pragma once
// Internal: a validating reader for zip archives held in memory (the container of torch.save
// files). Not installed.
#include <cstdint>
#include <map>
#include <string>

#include <torch/types.h>

namespace mdd {
namespace io {
namespace detail {

/// One member of a zip archive, with offsets already checked against the file.
struct ZipEntry {
  std::string name;
  uint64_t data_offset = 0;      ///< first byte of the member's (possibly compressed) data
  uint64_t compressed_size = 0;  ///< bytes at data_offset
  uint64_t size = 0;             ///< bytes after decompression
  uint32_t crc32 = 0;
  uint16_t method = 0;           ///< 0 = STORED, 8 = DEFLATED
};

/// Parses the central directory of a zip archive held in `bytes` (a 1-D uint8 CPU tensor, usually
/// the whole file from one read). Every offset and size (ZIP64 included) is validated against the
/// buffer on construction, so a truncated or corrupted archive throws `mdd::Error` here rather than
/// reading out of bounds later.
class ZipReader {
 public:
  ZipReader(torch::Tensor bytes, std::string what);

  /// Members by name.
  const std::map<std::string, ZipEntry>& entries() const { return entries_; }
  /// The member called `name`, or nullptr.
  const ZipEntry* find(const std::string& name) const;
  /// The member's bytes as a 1-D uint8 tensor. STORED members are views into the file buffer (no
  /// copy); DEFLATED members are inflated into a new tensor. With `verify_crc` the CRC-32 is checked.
  torch::Tensor read(const ZipEntry& entry, bool verify_crc = true) const;
  /// The file buffer.
  const torch::Tensor& bytes() const { return bytes_; }
  /// Name used in error messages (the file path).
  const std::string& what() const { return what_; }

 private:
  torch::Tensor bytes_;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  std::string what_;
  std::map<std::string, ZipEntry> entries_;
};

/// CRC-32 (zlib polynomial) of `size` bytes, processed in chunks so sizes above 4 GB work.
uint32_t crc32_of(const uint8_t* data, uint64_t size);

}  // namespace detail
}  // namespace io
}  // namespace mdd
