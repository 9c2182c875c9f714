#pragma once
// Internal (not installed): what run_distill writes once the stages are done — the contact sheet,
// report.json and report.md — kept apart from running the stages, so a change to the report never
// touches stage logic and the other way round.
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/types.h>

#include "mdd/data/labeled_images.h"
#include "mdd/eval/evaluator.h"
#include "mdd/pipeline/config.h"

namespace mdd::detail {

/// An evaluation result as report.json and the eval/ caches store it
/// ({mean, std, runs, last, last_mean, last_std, seconds}).
nlohmann::json eval_json(const EvalResult& r);
/// Inverse of `eval_json`; throws nlohmann::json errors on a malformed object.
EvalResult eval_from_json(const nlohmann::json& j);

/// Contact sheet of per-class rows (each [k, C, H, W] uint8); small images (Fashion-MNIST's 28 px)
/// are enlarged by pixel repetition so the sheet is legible.
torch::Tensor class_sheet(std::vector<torch::Tensor> rows);

/// Writes `path`: per class, up to 10 images of the shown generated set (minimax, else difffit,
/// else dit) followed by as many random real ones, separated by one empty cell. `sets` holds
/// "random" and the generated sets. Returns the line to log.
std::string write_contact_sheet(const std::string& path, const std::map<std::string, LabeledImages>& sets,
                                int64_t num_classes, int64_t ipc);

/// What the stages measured, for the report.
struct RunSummary {
  nlohmann::json results = nlohmann::json::object();  ///< method -> eval_json
  nlohmann::json full;                                ///< whole-set result (+ "epochs", "cached") or null
  nlohmann::json timings = nlohmann::json::object();  ///< stage -> seconds
  int64_t train_images = 0, test_images = 0;
};

/// The whole-set result an earlier run cached in `path` (eval/full.json), marked "cached", or null
/// when there is none or it cannot be read (the report then has no whole-set row).
nlohmann::json cached_full_set(const std::string& path);

/// Writes `<out>/report.json` and `<out>/report.md` atomically; returns report.json's path.
std::string write_report(const std::filesystem::path& out, const DistillConfig& config, const RunSummary& run);

}  // namespace mdd::detail
