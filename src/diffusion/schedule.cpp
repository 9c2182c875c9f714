#include "mdd/diffusion/schedule.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <set>

#include "mdd/util/error.h"

namespace mdd {
namespace {

constexpr double kPi = 3.14159265358979323846;

// Python's built-in round() on a float: nearest integer, ties to even.
int64_t python_round(double x) {
  const double fl = std::floor(x);
  const double diff = x - fl;
  double r;
  if (diff > 0.5) {
    r = fl + 1.0;
  } else if (diff < 0.5) {
    r = fl;
  } else {
    r = (std::fmod(fl, 2.0) == 0.0) ? fl : fl + 1.0;
  }
  return static_cast<int64_t>(r);
}

std::string strip(const std::string& s) {
  size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return s.substr(b, e - b);
}

// Python int(str) for the decimal strings the respacing syntax uses (surrounding blanks allowed,
// optional sign). Anything else is a user error, reported with the whole spec.
int64_t parse_int(const std::string& token, const std::string& spec) {
  const std::string s = strip(token);
  size_t i = 0;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
  if (i == s.size()) throw Error(fmt::format("timestep respacing '{}': '{}' is not an integer", spec, token));
  for (size_t k = i; k < s.size(); ++k) {
    if (!std::isdigit(static_cast<unsigned char>(s[k]))) {
      throw Error(fmt::format("timestep respacing '{}': '{}' is not an integer", spec, token));
    }
  }
  if (s.size() - i > 15) throw Error(fmt::format("timestep respacing '{}': '{}' is too large", spec, token));
  return std::stoll(s);
}

}  // namespace

std::vector<double> get_named_beta_schedule(const std::string& name, int64_t num_timesteps) {
  if (num_timesteps < 1) {
    throw Error(fmt::format("beta schedule '{}': num_timesteps must be >= 1, got {}", name, num_timesteps));
  }
  std::vector<double> betas(static_cast<size_t>(num_timesteps));
  if (name == "linear") {
    // Same arithmetic as numpy.linspace(start, stop, T): start + i * ((stop - start) / (T - 1)),
    // last element set to stop exactly.
    const double scale = 1000.0 / static_cast<double>(num_timesteps);
    const double start = scale * 0.0001;
    const double stop = scale * 0.02;
    if (num_timesteps == 1) {
      betas[0] = start;
    } else {
      const double step = (stop - start) / static_cast<double>(num_timesteps - 1);
      for (int64_t i = 0; i < num_timesteps; ++i) betas[i] = static_cast<double>(i) * step + start;
      betas.back() = stop;
    }
  } else if (name == "squaredcos_cap_v2" || name == "cosine") {
    auto alpha_bar = [](double t) {
      const double c = std::cos((t + 0.008) / 1.008 * kPi / 2.0);
      return c * c;
    };
    for (int64_t i = 0; i < num_timesteps; ++i) {
      const double t1 = static_cast<double>(i) / static_cast<double>(num_timesteps);
      const double t2 = static_cast<double>(i + 1) / static_cast<double>(num_timesteps);
      betas[i] = std::min(1.0 - alpha_bar(t2) / alpha_bar(t1), 0.999);
    }
  } else {
    throw Error(fmt::format("unknown beta schedule '{}' (expected 'linear' or 'squaredcos_cap_v2')", name));
  }
  return betas;
}

std::vector<int64_t> space_timesteps(int64_t num_timesteps, const std::string& section_counts) {
  if (num_timesteps < 1) {
    throw Error(fmt::format("timestep respacing '{}': num_timesteps must be >= 1, got {}", section_counts,
                            num_timesteps));
  }
  const std::string spec = strip(section_counts);
  std::vector<int64_t> counts;
  if (spec.empty()) {
    // create_diffusion("") respaces with [diffusion_steps]: every step is kept.
    counts.push_back(num_timesteps);
  } else if (spec.rfind("ddim", 0) == 0) {
    const int64_t desired = parse_int(spec.substr(4), section_counts);
    for (int64_t stride = 1; stride < num_timesteps; ++stride) {
      const int64_t n = (num_timesteps + stride - 1) / stride;  // len(range(0, T, stride))
      if (n == desired) {
        std::vector<int64_t> steps;
        for (int64_t s = 0; s < num_timesteps; s += stride) steps.push_back(s);
        return steps;
      }
    }
    throw Error(fmt::format("timestep respacing '{}': cannot create exactly {} steps out of {} with an integer stride",
                            section_counts, desired, num_timesteps));
  } else {
    size_t pos = 0;
    while (true) {
      const size_t comma = spec.find(',', pos);
      counts.push_back(parse_int(spec.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos),
                                 section_counts));
      if (comma == std::string::npos) break;
      pos = comma + 1;
    }
  }

  const int64_t k = static_cast<int64_t>(counts.size());
  const int64_t size_per = num_timesteps / k;
  const int64_t extra = num_timesteps % k;
  int64_t start_idx = 0;
  std::set<int64_t> all_steps;
  for (int64_t i = 0; i < k; ++i) {
    const int64_t size = size_per + (i < extra ? 1 : 0);
    const int64_t count = counts[i];
    if (count < 0) {
      throw Error(fmt::format("timestep respacing '{}': negative section count {}", section_counts, count));
    }
    if (size < count) {
      throw Error(fmt::format("timestep respacing '{}': cannot divide a section of {} steps into {}", section_counts,
                              size, count));
    }
    // The reference accumulates the fractional index by repeated addition (not i*stride) and
    // rounds with Python's round(); both matter for which steps are kept.
    const double frac_stride = count <= 1 ? 1.0 : static_cast<double>(size - 1) / static_cast<double>(count - 1);
    double cur = 0.0;
    for (int64_t j = 0; j < count; ++j) {
      all_steps.insert(start_idx + python_round(cur));
      cur += frac_stride;
    }
    start_idx += size;
  }
  if (all_steps.empty()) {
    throw Error(fmt::format("timestep respacing '{}' keeps no timesteps", section_counts));
  }
  return std::vector<int64_t>(all_steps.begin(), all_steps.end());
}

}  // namespace mdd
