#pragma once
/// \file
/// Reading and writing the safetensors format (https://github.com/huggingface/safetensors).

#include <map>
#include <string>

#include <torch/types.h>

#include "mdd/export.h"

namespace mdd {
namespace io {

/// Named tensors, sorted by name (the order safetensors and state_dicts use).
using TensorMap = std::map<std::string, torch::Tensor>;

/// The content of a safetensors file: its tensors and its `__metadata__` string map.
struct MDD_API SafeTensors {
  TensorMap tensors;
  std::map<std::string, std::string> metadata;
};

/// Reads a safetensors file. Supports F16, BF16, F32, F64, I8, I16, I32, I64, U8 and BOOL.
/// The file is validated completely (header bounds, JSON, dtype names, shapes, data offsets that
/// must tile the data section); any inconsistency throws `mdd::Error` naming the file and key.
/// Tensors are CPU, contiguous and own their memory.
MDD_API SafeTensors load_safetensors(const std::string& path);

/// Parses safetensors bytes already in memory (`what` names the source in error messages).
MDD_API SafeTensors parse_safetensors(const void* data, size_t size, const std::string& what = "<memory>");

/// Writes `tensors` (any device, any layout; written as contiguous CPU data) and `metadata` to
/// `path`. The write is atomic: data goes to a temporary file in the same directory which is then
/// renamed over `path`, so readers never see a half-written file.
MDD_API void save_safetensors(const std::string& path, const TensorMap& tensors,
                              const std::map<std::string, std::string>& metadata = {});

}  // namespace io
}  // namespace mdd
