#include "models/vae_options.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "mdd/util/error.h"

namespace mdd {

void check_options(const AutoencoderKLOptions& o, const OptionFail& fail) {
  for (auto [name, v] : {std::pair<const char*, int64_t>{"in_channels", o.in_channels()}, {"out_channels", o.out_channels()},
                         {"latent_channels", o.latent_channels()}, {"layers_per_block", o.layers_per_block()},
                         {"norm_num_groups", o.norm_num_groups()}})
    if (v <= 0) fail(name, fmt::format("must be > 0, got {}", v));
  const auto& ch = o.block_out_channels();
  if (ch.empty()) fail("block_out_channels", "must list at least one level");
  for (int64_t c : ch)
    if (c <= 0 || (o.norm_num_groups() > 0 && c % o.norm_num_groups() != 0)) {
      fail("block_out_channels", fmt::format("{} must be positive multiples of norm_num_groups {}", ch, o.norm_num_groups()));
      break;
    }
}

}  // namespace mdd

namespace mdd::vae::detail {

void validate_options(const AutoencoderKLOptions& o) { check_options(o, throw_option_error("AutoencoderKLOptions")); }

void validate_runtime(const VaeRuntimeOptions& r) {
  if (r.slice_size() < 0) throw Error(fmt::format("VaeRuntimeOptions: slice_size {} < 0", r.slice_size()));
  if (r.tile_latent_size() < 1 || r.tile_overlap() < 0 || r.tile_overlap() >= r.tile_latent_size())
    throw Error(fmt::format("VaeRuntimeOptions: need tile_latent_size >= 1 and 0 <= tile_overlap < "
                            "tile_latent_size, got {} and {}", r.tile_latent_size(), r.tile_overlap()));
}

}  // namespace mdd::vae::detail
