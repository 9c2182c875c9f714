#include "util/shape_str.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace mdd {

std::string shape_str(c10::IntArrayRef sizes) { return fmt::format("[{}]", fmt::join(sizes, ", ")); }

std::string shape_str(const torch::Tensor& t) { return t.defined() ? shape_str(t.sizes()) : std::string("<undefined>"); }

}  // namespace mdd
