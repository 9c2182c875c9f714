#pragma once
// Internal to the io area (not installed): parsing safetensors bytes that are already in a buffer,
// so load_weights can sniff and parse a file with a single read.
#include <string>

#include <torch/types.h>

#include "mdd/io/safetensors.h"

namespace mdd {
namespace io {

/// Parses a whole safetensors file held in `buffer` (uint8, CPU). Tensors are zero-copy views into
/// `buffer` where alignment allows (the views keep it alive). `what` names the source in errors.
SafeTensors parse_safetensors_buffer(const torch::Tensor& buffer, const std::string& what);

}  // namespace io
}  // namespace mdd
