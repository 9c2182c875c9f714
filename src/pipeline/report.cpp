#include "pipeline/report.h"

#include <algorithm>

#include <fmt/format.h>
#include <torch/torch.h>

#include "mdd/io/image.h"
#include "pipeline/config_json.h"
#include "util/file_util.h"

namespace mdd::detail {

using json = nlohmann::json;
namespace fs = std::filesystem;

json eval_json(const EvalResult& r) {
  return {{"mean", r.mean}, {"std", r.std}, {"runs", r.best}, {"last", r.last},
          {"last_mean", r.last_mean}, {"last_std", r.last_std}, {"seconds", r.seconds}};
}

EvalResult eval_from_json(const json& j) {
  EvalResult r;
  r.mean = j.at("mean").get<double>();
  r.std = j.at("std").get<double>();
  r.best = j.at("runs").get<std::vector<double>>();
  r.last = j.at("last").get<std::vector<double>>();
  r.last_mean = j.at("last_mean").get<double>();
  r.last_std = j.at("last_std").get<double>();
  r.seconds = j.at("seconds").get<double>();
  return r;
}

torch::Tensor class_sheet(std::vector<torch::Tensor> rows) {
  const int64_t h = rows.front().size(1);
  const int64_t zoom = h < 64 ? (96 + h - 1) / h : 1;
  if (zoom > 1)
    for (auto& r : rows) r = r.repeat_interleave(zoom, 1).repeat_interleave(zoom, 2).contiguous();
  return contact_sheet(rows, 2, 255);
}

std::string write_contact_sheet(const std::string& path, const std::map<std::string, LabeledImages>& sets,
                                int64_t num_classes, int64_t ipc) {
  const std::string shown =
      sets.count("minimax") ? "minimax" : (sets.count("difffit") ? "difffit" : (sets.count("dit") ? "dit" : ""));
  const LabeledImages& random = sets.at("random");
  std::vector<torch::Tensor> rows;
  const int64_t k = std::min<int64_t>(ipc, 10);
  for (int64_t c = 0; c < num_classes; ++c) {
    std::vector<torch::Tensor> cells;
    if (!shown.empty()) {
      const LabeledImages& s = sets.at(shown);
      auto g = s.images.index({s.labels == c}).slice(0, 0, k);
      cells.push_back(g);
      cells.push_back(torch::zeros_like(g.slice(0, 0, 1)));
    }
    cells.push_back(random.images.index({random.labels == c}).slice(0, 0, k));
    rows.push_back(torch::cat(cells, 0));
  }
  write_png(path, class_sheet(rows));
  return fmt::format("contact sheet: {} (per class: {} {} | {} random real)", path, k, shown.empty() ? "-" : shown, k);
}

json cached_full_set(const std::string& path) {
  const std::string cached = read_cache_text(path);
  if (cached.empty()) return nullptr;
  try {
    json j = json::parse(cached);
    json full = j.at("result");
    full["epochs"] = j.at("signature").at("epochs");
    full["cached"] = true;
    return full;
  } catch (const std::exception&) {
    return nullptr;
  }
}

std::string write_report(const fs::path& out, const DistillConfig& config, const RunSummary& run) {
  const int64_t ipc = config.sample.ipc;
  json report = {{"name", config.name},
                 {"ipc", ipc},
                 {"protocol", config.evaluate.protocol},
                 {"repeats", config.evaluate.repeats},
                 {"device", config.device},
                 {"results", run.results},
                 {"timings_s", run.timings},
                 {"samples_dir", (out / "samples").string()},
                 {"config", detail::config_json(config)}};
  if (!run.full.is_null()) report["full_set"] = run.full;
  const std::string report_path = (out / "report.json").string();
  write_text_file_atomic(report_path, report.dump(2) + "\n");

  static const std::map<std::string, std::string> label = {
      {"random", "Random real images"},
      {"dit", "Pre-trained DiT, no fine-tuning"},
      {"difffit", "DiffFit fine-tune, no minimax"},
      {"minimax", "Minimax fine-tune (ours)"}};
  std::string md = fmt::format("# {} — IPC {}\n\nProtocol `{}` ({} repeats, top-1 % on {} test images).\n\n"
                               "| method | accuracy (mean ± std) | runs |\n|---|---|---|\n",
                               config.name, ipc, config.evaluate.protocol, config.evaluate.repeats, run.test_images);
  for (const auto& m : config.evaluate.methods) {
    if (!run.results.contains(m)) continue;
    const json& r = run.results.at(m);
    std::string runs;
    for (double v : r.at("runs")) runs += fmt::format("{}{:.2f}", runs.empty() ? "" : " / ", v);
    md += fmt::format("| {} | {:.2f} ± {:.2f} | {} |\n", label.at(m), r.at("mean").get<double>(),
                      r.at("std").get<double>(), runs);
  }
  if (!run.full.is_null())
    md += fmt::format("| Whole training set ({} images, {} epoch(s){}) | {:.2f} ± {:.2f} | |\n", run.train_images,
                      run.full.at("epochs").dump(), run.full.contains("cached") ? ", cached" : "",
                      run.full.at("mean").get<double>(), run.full.at("std").get<double>());
  md += "\nStage timings (s): ";
  bool first = true;
  for (auto it = run.timings.begin(); it != run.timings.end(); ++it) {
    md += fmt::format("{}{} {}", first ? "" : ", ", it.key(), it.value().dump());
    first = false;
  }
  md += "\n\n![contact sheet](contact_sheet.png)\n";
  write_text_file_atomic((out / "report.md").string(), md);
  return report_path;
}

}  // namespace mdd::detail
