#pragma once
// Internal: one name table per enum gives both directions of its `X_name` / `parse_X` pair, so the
// accepted spellings and the error's list of choices cannot drift apart (not installed).
#include <array>
#include <string>
#include <utility>

#include "mdd/util/error.h"

namespace mdd::detail {

template <class E, size_t N>
using EnumNames = std::array<std::pair<E, const char*>, N>;

template <class E, size_t N>
const char* enum_name(const EnumNames<E, N>& table, E value) {
  for (const auto& [v, name] : table)
    if (v == value) return name;
  return "?";
}

// `what` names the quantity in the error, e.g. "evaluation protocol".
template <class E, size_t N>
E parse_enum(const EnumNames<E, N>& table, const std::string& what, const std::string& name) {
  std::string list;
  for (const auto& [v, n] : table) {
    if (name == n) return v;
    list += std::string(list.empty() ? "" : ", ") + n;
  }
  throw Error(what + " \"" + name + "\": expected one of " + list);
}

}  // namespace mdd::detail
