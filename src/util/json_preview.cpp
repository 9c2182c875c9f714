#include "util/json_preview.h"

#include <vector>

namespace mdd::detail {
namespace {

// A container being printed and how far into it the walk is.
struct Frame {
  const nlohmann::json* value;
  nlohmann::json::const_iterator it;
  bool first = true;
};

// Scalars only (never recursive). Long strings are cut before escaping so the work stays bounded.
std::string scalar_text(const nlohmann::json& v, std::size_t max_chars) {
  if (v.is_string()) {
    const auto& s = v.get_ref<const std::string&>();
    if (s.size() > max_chars)
      return nlohmann::json(s.substr(0, max_chars)).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "...";
  }
  return v.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace

std::string json_preview(const nlohmann::json& value, std::size_t max_chars) {
  std::string out;
  auto full = [&] { return out.size() >= max_chars; };
  auto emit = [&](const nlohmann::json& v, std::vector<Frame>& stack) {
    if (v.is_object() || v.is_array()) {
      out += v.is_object() ? '{' : '[';
      stack.push_back({&v, v.cbegin()});
    } else {
      out += scalar_text(v, max_chars);
    }
  };
  std::vector<Frame> stack;
  emit(value, stack);
  while (!stack.empty() && !full()) {
    Frame& f = stack.back();
    if (f.it == f.value->cend()) {
      out += f.value->is_object() ? '}' : ']';
      stack.pop_back();
      continue;
    }
    if (!f.first) out += ',';
    f.first = false;
    const nlohmann::json& child = *f.it;
    if (f.value->is_object()) out += scalar_text(nlohmann::json(f.it.key()), max_chars) + ':';
    ++f.it;  // before emit: emit may grow the stack and invalidate `f`
    emit(child, stack);
  }
  if (!stack.empty() || out.size() > max_chars) {
    if (out.size() > max_chars) out.resize(max_chars);
    out += "...";
  }
  return out;
}

std::string text_preview(const std::string& text, std::size_t max_chars) {
  return text.size() <= max_chars ? text : text.substr(0, max_chars) + "...";
}

}  // namespace mdd::detail
