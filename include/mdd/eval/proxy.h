#pragma once
/// \file
/// A fast proxy for the quality of a class-conditional generator, to choose recipes by in minutes
/// instead of a 3-repeat distillation evaluation.
///
/// One classifier (the `dc` ConvNet-3 by default) is trained once on the whole real training set
/// and then scores generated images two ways:
/// - **class faithfulness**: the percentage of generated images it assigns to their own class
///   (per class too: a generator whose sandals look like sneakers shows it here);
/// - **Fréchet distance** between its penultimate features of the generated images and of the
///   real test images (mean and covariance, as FID does with Inception features). The distance of
///   a same-sized random real subset is reported beside it, because with few images the estimate
///   is biased upwards: compare generators at the same image count, and against that floor.
#include <cstdint>
#include <string>
#include <vector>

#include <torch/arg.h>
#include <torch/nn/modules/container/any.h>
#include <torch/types.h>

#include "mdd/data/labeled_images.h"
#include "mdd/eval/evaluator.h"
#include "mdd/export.h"
#include "mdd/util/progress.h"

namespace mdd {

/// How the proxy classifier is trained (an `EvalOptions` recipe; `dc` ConvNet-3 by default).
struct MDD_API ProxyOptions {
  /// Training recipe of the classifier: protocol preset and overrides (epochs = 1 gives the dc
  /// schedule's 2 passes over the whole set).
  TORCH_ARG(EvalOptions, eval) = EvalOptions().protocol("dc").epochs(1);
  /// Seed of the classifier's initialisation and batch order.
  TORCH_ARG(uint64_t, seed) = 0;
  /// Seed of the random real subset that gives the Fréchet floor.
  TORCH_ARG(uint64_t, floor_seed) = 1;
};

/// What the proxy says about one set of generated images.
struct MDD_API ProxyScore {
  int64_t images = 0;                 ///< generated images scored
  double class_accuracy = 0;          ///< % of generated images classified as their label
  std::vector<double> per_class;      ///< the same per class (NaN for a class without images)
  double frechet = 0;                 ///< Fréchet distance of features: generated vs real test set
  double frechet_real_floor = 0;      ///< the same for `images` random real training images
  double real_test_accuracy = 0;      ///< the classifier's accuracy on the real test set
};

/// The trained proxy classifier and the real test features it compares against.
class MDD_API GeneratorProxy {
 public:
  /// Trains the classifier on `train` (every image) and caches the features of `test`.
  /// Progress stage "evaluate" (the Evaluator's). Throws mdd::Error on bad data.
  GeneratorProxy(const LabeledImages& train, const LabeledImages& test, ProxyOptions options = {},
                 const ProgressFn& progress = {});
  /// Loads a classifier written by `save` (no training) for the same kind of data.
  static GeneratorProxy load(const std::string& path, const LabeledImages& train, const LabeledImages& test);
  /// Writes the classifier and its recipe (safetensors, atomically).
  void save(const std::string& path) const;

  /// Scores generated uint8 images [N, H, W, C] with labels [N] (same layout as the real data).
  ProxyScore score(const LabeledImages& generated) const;

  /// The classifier's accuracy (%) on the real test set.
  double real_test_accuracy() const { return test_accuracy_; }
  /// The classifier's penultimate features of uint8 images [N, H, W, C].
  torch::Tensor features(const torch::Tensor& images_u8) const;

 private:
  GeneratorProxy() = default;
  void prepare_reference(const LabeledImages& train, const LabeledImages& test);
  ProxyOptions options_;
  ResolvedEval resolved_;
  mutable torch::nn::AnyModule net_;
  torch::Tensor test_features_, train_images_, train_labels_;
  double test_accuracy_ = 0;
};

/// Fréchet distance between Gaussians fitted to two feature sets [N1, D] and [N2, D] (float64
/// arithmetic; the matrix square root via symmetric eigendecompositions). Needs N1, N2 >= 2.
MDD_API double frechet_distance(const torch::Tensor& a, const torch::Tensor& b);

}  // namespace mdd
