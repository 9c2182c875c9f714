#pragma once
// Internal (not installed): how error messages print a shape, the same everywhere.
#include <string>

#include <c10/util/ArrayRef.h>
#include <torch/types.h>

namespace mdd {

/// "[2, 3, 32, 32]" for sizes {2, 3, 32, 32}; "[]" for a scalar.
std::string shape_str(c10::IntArrayRef sizes);
/// The shape of `t` as above, "<undefined>" for an undefined tensor.
std::string shape_str(const torch::Tensor& t);

}  // namespace mdd
