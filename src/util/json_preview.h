#pragma once
// Internal (not installed): bounded rendering of untrusted JSON values for error messages.
#include <cstddef>
#include <string>

#include <nlohmann/json.hpp>

namespace mdd::detail {

/// Compact JSON text of `value`, cut to about `max_chars` characters (a cut ends in "..."). Walks
/// the value with an explicit stack, never by recursion, and stops at the budget: a value nested a
/// million levels deep (a 600 KB safetensors header can hold one) costs O(max_chars) time and no
/// stack, where nlohmann::json::dump() would recurse once per level and overflow the stack.
std::string json_preview(const nlohmann::json& value, std::size_t max_chars = 120);

/// `text` cut to `max_chars` bytes (plus "..." when cut), for names read from untrusted files.
std::string text_preview(const std::string& text, std::size_t max_chars = 120);

}  // namespace mdd::detail
