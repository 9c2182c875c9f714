#include "models/vae_options.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "mdd/util/error.h"

namespace mdd::vae::detail {

void validate_options(const AutoencoderKLOptions& o) {
  const auto& ch = o.block_out_channels();
  if (ch.empty()) throw Error("AutoencoderKLOptions: block_out_channels is empty");
  for (int64_t c : ch) {
    if (c <= 0 || o.norm_num_groups() <= 0 || c % o.norm_num_groups() != 0)
      throw Error(fmt::format("AutoencoderKLOptions: block_out_channels {} must be positive multiples of "
                              "norm_num_groups {}", ch, o.norm_num_groups()));
  }
  if (o.in_channels() <= 0 || o.out_channels() <= 0 || o.latent_channels() <= 0 || o.layers_per_block() <= 0)
    throw Error(fmt::format("AutoencoderKLOptions: in_channels {}, out_channels {}, latent_channels {} and "
                            "layers_per_block {} must be positive", o.in_channels(), o.out_channels(),
                            o.latent_channels(), o.layers_per_block()));
}

void validate_runtime(const VaeRuntimeOptions& r) {
  if (r.slice_size() < 0) throw Error(fmt::format("VaeRuntimeOptions: slice_size {} < 0", r.slice_size()));
  if (r.tile_latent_size() < 1 || r.tile_overlap() < 0 || r.tile_overlap() >= r.tile_latent_size())
    throw Error(fmt::format("VaeRuntimeOptions: need tile_latent_size >= 1 and 0 <= tile_overlap < "
                            "tile_latent_size, got {} and {}", r.tile_latent_size(), r.tile_overlap()));
}

}  // namespace mdd::vae::detail
