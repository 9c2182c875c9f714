#include "mdd/util/option_check.h"

#include <utility>

#include "mdd/util/error.h"

namespace mdd {

OptionFail throw_option_error(std::string who) {
  return [who = std::move(who)](const std::string& option, const std::string& rule) {
    throw Error(who + ": " + option + " " + rule);
  };
}

}  // namespace mdd
