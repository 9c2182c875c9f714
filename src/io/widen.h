#pragma once
// Element types that weight files may hold but LibTorch 1.13 has no dtype for (uint16/32/64 and
// the two OCP float8 formats): both readers (safetensors and torch.save) decode them into the
// nearest wider type, so one rule serves both. Not installed.
#include <cstdint>
#include <string>
#include <vector>

#include <torch/types.h>

namespace mdd {
namespace io {
namespace detail {

/// Bytes per element of a widened type by its safetensors name ("U16", "U32", "U64", "F8_E4M3",
/// "F8_E5M2"); 0 for any other name.
size_t widened_size(const std::string& name);

/// Decodes `n` little-endian elements at `p` of widened type `name`: U16 -> int32, U32/U64 -> int64
/// (a U64 above INT64_MAX is an mdd::Error naming `what` and `key`), F8 -> float32. Shape `shape`.
torch::Tensor decode_widened(const std::string& name, const uint8_t* p, int64_t n, const std::vector<int64_t>& shape,
                             const std::string& what, const std::string& key);

/// A torch dtype name as pickled by PyTorch 2.x (`torch.float32`, `torch.uint16`, ...): the native
/// ScalarType in `native` (returns true), or the safetensors name of a widened type in `widened`
/// (returns true). False for names mdd cannot load.
bool torch_dtype_by_name(const std::string& qualified_name, torch::ScalarType* native, std::string* widened);

}  // namespace detail
}  // namespace io
}  // namespace mdd
