#pragma once
/// \file
/// Noise schedules and timestep respacing, exactly as the reference diffusion package
/// (DiT `diffusion/gaussian_diffusion.py` get_named_beta_schedule, `diffusion/respace.py`
/// space_timesteps) computes them: float64 arithmetic in the same order, Python `round`.

#include <cstdint>
#include <string>
#include <vector>

#include "mdd/export.h"

namespace mdd {

/// Beta schedule by name, in float64, of length `num_timesteps`.
///  - "linear": linspace(scale*1e-4, scale*0.02, T) with scale = 1000/T (numpy.linspace arithmetic);
///  - "squaredcos_cap_v2" (alias "cosine"): betas_for_alpha_bar with
///    alpha_bar(t) = cos((t + 0.008)/1.008 * pi/2)^2, each beta capped at 0.999.
/// Throws mdd::Error for an unknown name or num_timesteps < 1.
MDD_API std::vector<double> get_named_beta_schedule(const std::string& name, int64_t num_timesteps);

/// The original timesteps kept when respacing a `num_timesteps` process, sorted ascending.
/// `section_counts` follows the reference:
///  - "" keeps all steps;
///  - "N" or "N1,N2,..." splits [0, T) into equal sections (the first T % k one step longer) and
///    takes N_i evenly strided steps per section: index round(k * stride) accumulated by repeated
///    float64 addition, stride = (size-1)/(N_i-1), Python round (ties to even);
///  - "ddimN" takes range(0, T, s) for the smallest integer stride s giving exactly N steps.
/// Throws mdd::Error for unparsable strings or impossible requests (a section asked for more
/// steps than it has, no integer DDIM stride, no steps at all).
MDD_API std::vector<int64_t> space_timesteps(int64_t num_timesteps, const std::string& section_counts);

}  // namespace mdd
