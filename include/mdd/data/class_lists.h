#pragma once
/// \file
/// ImageNet class lists used by the reference code (MinimaxDiffusion `misc/class_*.txt`) and the
/// standard ImageNet-1k index of every synset.

#include <cstdint>
#include <string>
#include <vector>

#include "mdd/export.h"

namespace mdd {

/// The 1000 ImageNet-1k synsets in standard order (sorted; index = the class index DiT was trained
/// with, as in the reference's `misc/class_indices.txt`).
MDD_API const std::vector<std::string>& imagenet_synsets();

/// Standard ImageNet-1k index of `synset`, or -1 when it is not one of the 1000.
MDD_API int64_t imagenet_index(const std::string& synset);

/// A named class list, in the reference file's (unsorted) order:
/// "woof" (ImageWoof, misc/class_woof.txt), "nette" (ImageNette, misc/class_nette.txt),
/// "class100" (IDC's 100-class list, misc/class100.txt; its first 10 are ImageIDC), "idc" (those
/// first 10), "imagenet" (all 1000). Unknown names throw `mdd::Error` listing the known ones.
MDD_API std::vector<std::string> class_list(const std::string& name);

/// The reference's class selection (data.py `find_subclasses` with seed 0): spec "woof" -> the
/// woof file, "nette" -> the nette file, anything else -> class100; then lines
/// [nclass * phase, nclass * (phase + 1)). Throws when the slice runs past the list.
MDD_API std::vector<std::string> spec_classes(const std::string& spec, int64_t nclass = 10, int64_t phase = 0);

/// Reads a class list file: one class folder name per line (whitespace trimmed, blank lines and
/// lines starting with '#' skipped). Throws `mdd::Error` naming the file when missing or empty.
MDD_API std::vector<std::string> read_class_list(const std::string& path);

}  // namespace mdd
