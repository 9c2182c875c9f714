#pragma once
// Shared helper of the example programs (not part of the library): turns mdd::Progress events into
// a progress bar with rate and ETA on a terminal, or plain periodic lines when output is redirected.
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

#include <mdd/util/progress.h>

namespace mdd_examples {

class ProgressPrinter {
 public:
  /// `min_interval_s`: how often plain (non-TTY) lines are written.
  explicit ProgressPrinter(double min_interval_s = 5.0) : tty_(::isatty(fileno(stderr))), interval_(min_interval_s) {}

  /// A callback suitable for every mdd API taking a ProgressFn.
  mdd::ProgressFn callback() {
    return [this](const mdd::Progress& p) { update(p); };
  }

  /// Ends a partially drawn bar line so that other output starts on a fresh line.
  void interrupt() {
    if (tty_ && !stage_.empty()) {
      std::fputc('\n', stderr);
      last_print_ = -1e9;
    }
  }

  void update(const mdd::Progress& p) {
    const bool done = p.total > 0 && p.step >= p.total;
    if (p.stage != stage_) {
      if (!stage_.empty() && tty_) std::fputc('\n', stderr);
      stage_ = p.stage;
      last_print_ = -1e9;
      // A resumed run reports its first event at the checkpoint's step: measure the rate from there,
      // or the steps done before the resume would inflate it (and shrink the ETA) for the whole run.
      first_step_ = p.step;
      first_elapsed_ = p.elapsed_s;
    }
    if (!tty_ && !done && p.elapsed_s - last_print_ < interval_) return;
    last_print_ = p.elapsed_s;
    const double dt = p.elapsed_s - first_elapsed_;
    const double rate = dt > 0 ? double(p.step - first_step_) / dt : 0.0;
    const double eta = (rate > 0 && p.total > 0) ? double(p.total - p.step) / rate : 0.0;
    if (tty_) {
      const int width = 30;
      const int filled = p.total > 0 ? int(width * double(p.step) / double(p.total)) : 0;
      std::fprintf(stderr, "\r%-10s [%s%s] %lld/%lld %.2f/s ETA %s   ", p.stage.c_str(), std::string(filled, '#').c_str(),
                   std::string(width - filled, '.').c_str(), (long long)p.step, (long long)p.total, rate, fmt_time(eta).c_str());
      if (done) std::fputc('\n', stderr);
    } else {
      std::fprintf(stderr, "%s: %lld/%lld (%.2f/s, elapsed %s, ETA %s)\n", p.stage.c_str(), (long long)p.step, (long long)p.total,
                   rate, fmt_time(p.elapsed_s).c_str(), fmt_time(eta).c_str());
    }
    std::fflush(stderr);
    if (done) stage_.clear();
  }

 private:
  static std::string fmt_time(double s) {
    char buf[32];
    const long t = long(s + 0.5);
    std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", t / 3600, (t / 60) % 60, t % 60);
    return buf;
  }
  bool tty_;
  double interval_;
  double last_print_ = -1e9;
  std::string stage_;
  int64_t first_step_ = 0;
  double first_elapsed_ = 0.0;
};

}  // namespace mdd_examples
