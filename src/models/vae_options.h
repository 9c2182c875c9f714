#pragma once
// Internal (not installed): the checks of AutoencoderKL's options, shared by the constructor and the
// diffusers config reader (which prefixes the file name).
#include "mdd/models/autoencoder_kl.h"

namespace mdd::vae::detail {

/// Throws mdd::Error unless the architecture is buildable (positive sizes, channel counts that
/// are multiples of norm_num_groups).
void validate_options(const AutoencoderKLOptions& o);
/// Throws mdd::Error for a negative slice size or a tile overlap outside [0, tile_latent_size).
void validate_runtime(const VaeRuntimeOptions& r);

}  // namespace mdd::vae::detail
