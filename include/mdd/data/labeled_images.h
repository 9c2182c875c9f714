#pragma once
/// \file
/// A labelled image set held in memory: the type every reader returns and every consumer takes.
/// It has its own header so that consumers (evaluator, selection, VAE trainer, latent cache) do not
/// include a dataset reader to get a type.

#include <string>
#include <vector>

#include <torch/types.h>

#include "mdd/export.h"

namespace mdd {

/// A labelled image set held in memory: `images` uint8 [N, H, W, C] (as decoded / as saved to PNG),
/// `labels` int64 [N] in [0, class_names.size()).
struct MDD_API LabeledImages {
  torch::Tensor images;
  torch::Tensor labels;
  std::vector<std::string> class_names;
};

}  // namespace mdd
