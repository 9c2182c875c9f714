#pragma once
/// \file
/// Labelled image sets in memory, and the Fashion-MNIST reader.

#include <string>
#include <vector>

#include <torch/types.h>

namespace mdd {

/// A labelled image set held in memory: `images` uint8 [N, H, W, C] (as decoded / as saved to PNG),
/// `labels` int64 [N] in [0, class_names.size()).
struct LabeledImages {
  torch::Tensor images;
  torch::Tensor labels;
  std::vector<std::string> class_names;
};

/// Reads Fashion-MNIST from its gzipped IDX files (`train-images-idx3-ubyte.gz`, ... in `dir`).
/// `split` is "train" (60000 images) or "test" (10000). Images are uint8 [N, 28, 28, 1].
/// Magic numbers, sizes and gzip integrity are validated; errors name the file.
/// Labels are 0..9 with `class_names` = fashion_mnist_class_names(). When only the uncompressed
/// IDX files are present (no `.gz`), they are read directly.
LabeledImages load_fashion_mnist(const std::string& dir = "/usr/share/datasets/fashion-mnist",
                                 const std::string& split = "train");

/// The ten Fashion-MNIST class names: T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt,
/// Sneaker, Bag, Ankle boot.
const std::vector<std::string>& fashion_mnist_class_names();

}  // namespace mdd
