#include "util/json_read.h"

#include <fmt/format.h>

#include "mdd/util/error.h"
#include "util/json_preview.h"

namespace mdd::detail {

namespace {
[[noreturn]] void expected(const char* what, const nlohmann::json& value, const std::string& where) {
  throw Error(fmt::format("{}: expected {}, got {}", where, what, json_preview(value)));
}
}  // namespace

int64_t json_int(const nlohmann::json& value, const std::string& where) {
  if (!value.is_number_integer()) expected("an integer", value, where);
  return value.get<int64_t>();
}

uint64_t json_uint(const nlohmann::json& value, const std::string& where) {
  if (!value.is_number_integer() || (!value.is_number_unsigned() && value.get<int64_t>() < 0))
    expected("a non-negative integer", value, where);
  return value.get<uint64_t>();
}

double json_number(const nlohmann::json& value, const std::string& where) {
  if (!value.is_number()) expected("a number", value, where);
  return value.get<double>();
}

bool json_bool(const nlohmann::json& value, const std::string& where) {
  if (!value.is_boolean()) expected("true or false", value, where);
  return value.get<bool>();
}

std::string json_string(const nlohmann::json& value, const std::string& where) {
  if (!value.is_string()) expected("a string", value, where);
  return value.get<std::string>();
}

std::vector<std::string> json_string_list(const nlohmann::json& value, const std::string& where) {
  if (!value.is_array()) expected("a list of strings", value, where);
  std::vector<std::string> out;
  for (const auto& e : value) {
    if (!e.is_string()) expected("a list of strings", value, where);
    out.push_back(e.get<std::string>());
  }
  return out;
}

std::vector<int64_t> json_int_list(const nlohmann::json& value, const std::string& where) {
  if (!value.is_array()) expected("a list of integers", value, where);
  std::vector<int64_t> out;
  for (const auto& e : value) {
    if (!e.is_number_integer()) expected("a list of integers", value, where);
    out.push_back(e.get<int64_t>());
  }
  return out;
}

}  // namespace mdd::detail
