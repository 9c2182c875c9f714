#pragma once
/// \file
/// The Fashion-MNIST reader (`LabeledImages` itself lives in labeled_images.h; included here so that
/// code written against this header keeps compiling).

#include <string>
#include <vector>

#include "mdd/data/labeled_images.h"
#include "mdd/export.h"

namespace mdd {

/// Reads Fashion-MNIST from its gzipped IDX files (`train-images-idx3-ubyte.gz`, ... in `dir`).
/// `split` is "train" (60000 images) or "test" (10000). Images are uint8 [N, 28, 28, 1].
/// Magic numbers, sizes and gzip integrity are validated; errors name the file.
/// Labels are 0..9 with `class_names` = fashion_mnist_class_names(). When only the uncompressed
/// IDX files are present (no `.gz`), they are read directly.
MDD_API LabeledImages load_fashion_mnist(const std::string& dir = "/usr/share/datasets/fashion-mnist",
                                         const std::string& split = "train");

/// The ten Fashion-MNIST class names: T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt,
/// Sneaker, Bag, Ankle boot.
MDD_API const std::vector<std::string>& fashion_mnist_class_names();

}  // namespace mdd
