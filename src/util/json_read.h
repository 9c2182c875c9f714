#pragma once
// Internal (not installed): typed reads of untrusted JSON values, shared by every reader of a JSON
// file (the distill config, diffusers VAE configs). Each throws mdd::Error
// "<where>: expected <type>, got <bounded preview of the value>".
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mdd::detail {

int64_t json_int(const nlohmann::json& value, const std::string& where);
/// A non-negative integer.
uint64_t json_uint(const nlohmann::json& value, const std::string& where);
/// Any number (integers included).
double json_number(const nlohmann::json& value, const std::string& where);
bool json_bool(const nlohmann::json& value, const std::string& where);
std::string json_string(const nlohmann::json& value, const std::string& where);
std::vector<std::string> json_string_list(const nlohmann::json& value, const std::string& where);
std::vector<int64_t> json_int_list(const nlohmann::json& value, const std::string& where);

}  // namespace mdd::detail
