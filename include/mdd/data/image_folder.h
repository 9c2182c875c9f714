#pragma once
/// \file
/// Class-per-folder image datasets (`root/<class>/**/<image>`), with the reference's class lists,
/// label rules and `--ipc` subset (MinimaxDiffusion data.py `ImageFolder`, torchvision make_dataset).

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <torch/arg.h>
#include <torch/types.h>

#include "mdd/data/labeled_images.h"
#include "mdd/export.h"
#include "mdd/util/progress.h"

namespace mdd {

/// Maps a decoded uint8 [H, W, C] image to the uint8 image that is stored (e.g. a crop).
using ImageTransform = std::function<torch::Tensor(const torch::Tensor& image_u8)>;

/// The DiT / MinimaxDiffusion training crop: `center_crop_arr(image, size)`.
MDD_API ImageTransform adm_transform(int64_t size = 256);

/// The evaluation geometry: torchvision `Resize(size)` + `CenterCrop(size)` (uint8 part of
/// `transform_imagenet(size)`; ToTensor/Normalize come later, as floats).
MDD_API ImageTransform resize_center_crop_transform(int64_t size = 224);

/// Options of an ImageFolder. Class selection, in priority order: explicit `classes`, else `spec`
/// (reference class files: "woof", "nette", anything else = IDC's class100, sliced by
/// nclass/phase), else every sub-directory of the root in sorted order.
struct MDD_API ImageFolderOptions {
  /// Class folder names in label order (label = position).
  TORCH_ARG(std::vector<std::string>, classes) = std::vector<std::string>{};
  /// Reference `--spec` ("woof", "nette", "idc", ...); empty = not used.
  TORCH_ARG(std::string, spec) = "";
  /// Reference `--nclass` (classes taken from the spec list).
  TORCH_ARG(int64_t, nclass) = 10;
  /// Reference `--phase`: spec lines [nclass * phase, nclass * (phase + 1)).
  TORCH_ARG(int64_t, phase) = 0;
  /// Images per class; 0 = all. Takes the FIRST ipc files of each class in sorted path order, as the
  /// reference's `--slct_type random` does (lexicographic: 0, 1, 10, 11, ...). Must not exceed the
  /// smallest class.
  TORCH_ARG(int64_t, ipc) = 0;
  /// Accepted file extensions (case-insensitive suffix match, as torchvision). Files with other
  /// extensions are ignored. Only PNG and JPEG decode (read_image); BMP/PPM/PGM stay listed, as in
  /// torchvision, so that a folder holding them fails loudly instead of silently losing images.
  TORCH_ARG(std::vector<std::string>, extensions) =
      std::vector<std::string>{".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm"};
  /// Channels to decode (3 = RGB like the reference's `convert("RGB")`, 1 = grey).
  TORCH_ARG(int64_t, channels) = 3;
};

/// One file of an ImageFolder and its local label.
struct MDD_API ImageSample {
  std::string path;
  int64_t label = 0;
};

/// A scanned image folder. Samples are ordered like torchvision's make_dataset: classes by folder
/// NAME, inside a class by sorted directory path then sorted file name (sub-folders included).
class MDD_API ImageFolder {
 public:
  /// Scans `root`. Throws `mdd::Error` when the root is missing, a selected class folder is missing
  /// or holds no image, or `ipc` exceeds the smallest class.
  explicit ImageFolder(std::string root, ImageFolderOptions options = {});

  /// The scanned root directory.
  const std::string& root() const { return root_; }
  /// Class folder names in label order.
  const std::vector<std::string>& classes() const { return classes_; }
  /// Every selected file with its local label.
  const std::vector<ImageSample>& samples() const { return samples_; }
  /// Number of samples.
  int64_t size() const { return int64_t(samples_.size()); }
  /// Local labels of all samples, int64 [N].
  torch::Tensor labels() const;
  /// Per class: index of its folder in the sorted listing of the root (data.py
  /// `find_original_classes`: the label DiT is conditioned on when the root is an ImageNet train dir).
  const std::vector<int64_t>& dit_labels() const { return dit_labels_; }
  /// Per class: the standard ImageNet-1k index of the folder name (-1 when it is not a synset);
  /// the label sample.py uses (misc/class_indices.txt), independent of what else is in the root.
  std::vector<int64_t> imagenet_labels() const;
  /// Decodes sample `index` (uint8 [H, W, C]); errors name the file.
  torch::Tensor read(int64_t index) const;
  /// Decodes and transforms every sample with `num_threads` threads (0 = hardware concurrency)
  /// into memory. All transformed images must share one shape. Progress stage: "load_images".
  LabeledImages load(const ImageTransform& transform = {}, int64_t num_threads = 0,
                     const ProgressFn& progress = {}) const;

 private:
  std::string root_;
  ImageFolderOptions options_;
  std::vector<std::string> classes_;
  std::vector<ImageSample> samples_;
  std::vector<int64_t> dit_labels_;
};

}  // namespace mdd
