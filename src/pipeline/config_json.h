#pragma once
// Internal (not installed): the resolved config as a JSON value, for stage signatures and the report.
// Built from the same field table as config_to_json, so a section is read without printing and
// re-parsing the whole config.
#include <nlohmann/json.hpp>

#include "mdd/pipeline/config.h"

namespace mdd::detail {

/// {"name": ..., "data": {...}, ...}: what `config_to_json` prints.
nlohmann::json config_json(const DistillConfig& config);

}  // namespace mdd::detail
