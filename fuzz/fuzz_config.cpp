// Pipeline configs: JSON parsing, key binding and validation, and command-line overrides (the
// input after the first newline, if any, is applied as one "--set key=value").
#include <cstddef>
#include <cstdint>
#include <string>

#include "mdd/pipeline/config.h"
#include "mdd/util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const auto nl = text.find('\n');
  try {
    mdd::DistillConfig c = mdd::parse_config(text.substr(0, nl), "fuzz.json");
    (void)mdd::config_to_json(c);
    if (nl != std::string::npos) mdd::apply_override(c, text.substr(nl + 1));
  } catch (const mdd::Error&) {
  }
  try {
    mdd::DistillConfig d;
    mdd::apply_override(d, text);
  } catch (const mdd::Error&) {
  }
  return 0;
}
