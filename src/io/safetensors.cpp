#include "mdd/io/safetensors.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "io/safetensors_internal.h"
#include "io/widen.h"
#include "mdd/util/error.h"
#include "util/file_util.h"
#include "util/json_preview.h"

namespace mdd {
namespace io {
namespace {

// The JSON header is bounded so a hostile length field cannot make us allocate gigabytes.
constexpr uint64_t kMaxHeaderBytes = uint64_t(100) << 20;

struct DTypeInfo {
  const char* name;
  torch::ScalarType stored;  // dtype the bytes are reinterpreted as
  size_t size;
};

// safetensors dtypes LibTorch 1.13 represents natively.
const DTypeInfo kNative[] = {
    {"F16", torch::kHalf, 2},  {"BF16", torch::kBFloat16, 2}, {"F32", torch::kFloat, 4},
    {"F64", torch::kDouble, 8}, {"I8", torch::kChar, 1},      {"I16", torch::kShort, 2},
    {"I32", torch::kInt, 4},   {"I64", torch::kLong, 8},      {"U8", torch::kByte, 1},
    {"BOOL", torch::kBool, 1},
};

const DTypeInfo* find_native(const std::string& name) {
  for (const auto& d : kNative)
    if (name == d.name) return &d;
  return nullptr;
}

const char* dtype_name(torch::ScalarType t) {
  for (const auto& d : kNative)
    if (d.stored == t) return d.name;
  return nullptr;
}


}  // namespace

SafeTensors parse_safetensors_buffer(const torch::Tensor& buffer, const std::string& what) {
  static_assert(sizeof(void*) == 8, "64-bit host required");
  const auto* base = buffer.data_ptr<uint8_t>();
  const uint64_t size = uint64_t(buffer.numel());
  if (size < 8) throw Error(fmt::format("{}: not a safetensors file (only {} bytes, need an 8-byte header length)", what, size));
  uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);  // little-endian host (x86-64, aarch64)
  if (header_len > size - 8)
    throw Error(fmt::format("{}: safetensors header length {} runs past the end of the file ({} bytes)", what, header_len, size));
  if (header_len > kMaxHeaderBytes)
    throw Error(fmt::format("{}: safetensors header length {} exceeds the {} byte limit", what, header_len, kMaxHeaderBytes));
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(reinterpret_cast<const char*>(base + 8), reinterpret_cast<const char*>(base + 8 + header_len));
  } catch (const std::exception& e) {
    throw Error(fmt::format("{}: safetensors header is not valid JSON ({})", what, e.what()));
  }
  if (!header.is_object()) throw Error(fmt::format("{}: safetensors header is not a JSON object", what));

  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = size - data_start;
  const uint8_t* data = base + data_start;
  SafeTensors out;
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& key = it.key();
    const auto& v = it.value();
    if (key == "__metadata__") {
      if (!v.is_object()) throw Error(fmt::format("{}: __metadata__ must be an object of strings", what));
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) throw Error(fmt::format("{}: __metadata__ value of '{}' is not a string", what, m.key()));
        out.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets") ||
        !v["dtype"].is_string() || !v["shape"].is_array() || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2)
      throw Error(fmt::format("{}: tensor '{}' needs dtype (string), shape (array) and data_offsets ([begin, end])", what, key));
    const std::string dt = v["dtype"].get<std::string>();
    const DTypeInfo* native = find_native(dt);
    const size_t esize = native ? native->size : detail::widened_size(dt);
    if (esize == 0) throw Error(fmt::format("{}: tensor '{}' has unknown dtype '{}'", what, key, dt));
    std::vector<int64_t> shape;
    uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0)
        throw Error(fmt::format("{}: tensor '{}' has an invalid dimension {} (dims must be non-negative integers)", what, key, mdd::detail::json_preview(d)));
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / dim / esize)
        throw Error(fmt::format("{}: tensor '{}' shape overflows", what, key));
      numel *= dim;
      shape.push_back(int64_t(dim));
    }
    const auto& off = v["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      throw Error(fmt::format("{}: tensor '{}' data_offsets must be non-negative integers", what, key));
    const uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
    if (b > e || e > data_size)
      throw Error(fmt::format("{}: tensor '{}' data_offsets [{}, {}] out of range (data section holds {} bytes)", what, key, b, e, data_size));
    if (e - b != numel * esize)
      throw Error(fmt::format("{}: tensor '{}' of dtype {} and {} elements needs {} bytes but data_offsets span {}", what, key, dt,
                              numel, numel * esize, e - b));
    ranges.emplace_back(b, e);
    const uint8_t* p = data + b;
    torch::Tensor t;
    if (!native) {
      t = detail::decode_widened(dt, p, int64_t(numel), shape, what, key);
    } else if (numel == 0) {
      t = torch::empty(shape, native->stored);
    } else {
      if (native->stored == torch::kBool)
        for (uint64_t i = 0; i < numel; ++i)
          if (p[i] > 1) throw Error(fmt::format("{}: tensor '{}' (BOOL) holds byte {} (only 0/1 allowed)", what, key, int(p[i])));
      if (reinterpret_cast<uintptr_t>(p) % esize == 0) {
        // Zero copy: a view into the single read buffer, which the deleter keeps alive.
        t = torch::from_blob(const_cast<uint8_t*>(p), shape, [keep = buffer](void*) {}, torch::TensorOptions().dtype(native->stored));
      } else {
        t = torch::empty(shape, native->stored);
        std::memcpy(t.data_ptr(), p, numel * esize);
      }
    }
    out.tensors.emplace(key, std::move(t));
  }
  // The data section must be tiled exactly by the tensors: no gaps, overlaps or trailing bytes.
  std::sort(ranges.begin(), ranges.end());
  uint64_t cursor = 0;
  for (const auto& r : ranges) {
    if (r.first != cursor)
      throw Error(fmt::format("{}: tensor data at bytes [{}, {}) {} the previous tensor (expected to start at {})", what, r.first,
                              r.second, r.first < cursor ? "overlaps" : "leaves a gap after", cursor));
    cursor = r.second;
  }
  if (cursor != data_size)
    throw Error(fmt::format("{}: {} trailing bytes after the last tensor (file truncated or corrupt?)", what, data_size - cursor));
  return out;
}

SafeTensors parse_safetensors(const void* data, size_t size, const std::string& what) {
  auto buffer = torch::empty({int64_t(size)}, torch::kByte);
  if (size) std::memcpy(buffer.data_ptr(), data, size);
  return parse_safetensors_buffer(buffer, what);
}

SafeTensors load_safetensors(const std::string& path) {
  return parse_safetensors_buffer(read_file_bytes(path), path);
}

void save_safetensors(const std::string& path, const TensorMap& tensors, const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<torch::Tensor> blobs;
  uint64_t offset = 0;
  for (const auto& [key, value] : tensors) {
    if (key == "__metadata__") throw Error(fmt::format("{}: '__metadata__' is reserved and cannot name a tensor", path));
    if (!value.defined()) throw Error(fmt::format("{}: tensor '{}' is undefined", path, key));
    const char* dt = dtype_name(value.scalar_type());
    if (!dt) throw Error(fmt::format("{}: tensor '{}' has dtype {} which safetensors cannot store", path, key, c10::toString(value.scalar_type())));
    auto blob = value.detach().to(torch::kCPU).contiguous();
    const uint64_t nbytes = uint64_t(blob.numel()) * blob.element_size();
    header[key] = {{"dtype", dt}, {"shape", blob.sizes().vec()}, {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    blobs.push_back(std::move(blob));
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');  // keeps the data section 8-byte aligned
  AtomicFileWriter out(path);
  const uint64_t len = json.size();
  out.write(&len, 8);
  out.write(json.data(), json.size());
  for (const auto& b : blobs) out.write(b.data_ptr(), size_t(b.numel()) * b.element_size());
  out.commit();
}

}  // namespace io
}  // namespace mdd
