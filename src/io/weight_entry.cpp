#include "mdd/io/weight_entry.h"

#include "mdd/util/error.h"

namespace mdd {
namespace io {

std::string default_weight_entry(const std::function<bool(const std::string& entry)>& present) {
  for (const char* name : {kEmaEntry, kModelEntry})
    if (present(name)) return name;
  return "";
}

void check_weight_entry(const std::string& entry, const std::string& where) {
  if (!entry.empty() && entry != kEmaEntry && entry != kModelEntry)
    throw Error(where + ": entry must be \"\", \"" + kEmaEntry + "\" or \"" + kModelEntry + "\", got \"" + entry + "\"");
}

}  // namespace io
}  // namespace mdd
