#pragma once
/// \file
/// How a component reports the rules its options break: one validator per options struct
/// (`check_options(const XOptions&, const OptionFail&)`, declared beside `XOptions`), used both by the
/// component's constructor (which throws) and by `validate_config` (which names the config key), so a
/// rule is written once and the two can never disagree.

#include <functional>
#include <string>

#include "mdd/export.h"

namespace mdd {

/// Receives one broken rule: `option` is the `TORCH_ARG` name of the offending option (also its key
/// within the config section that sets it) and `rule` completes the sentence, e.g. "must be > 0, got -1".
/// A validator stops at the first rule when `fail` throws and reports every broken rule otherwise.
using OptionFail = std::function<void(const std::string& option, const std::string& rule)>;

/// An `OptionFail` that throws `mdd::Error("<who>: <option> <rule>")`: what constructors pass.
MDD_API OptionFail throw_option_error(std::string who);

}  // namespace mdd
