#pragma once
/// \file
/// The one budget every decoder of untrusted input checks before it allocates: zip and gzip
/// inflation, the `.pt` unpickler, tensor views described by a file, and image decoding and
/// resizing. A small hostile file must fail with `mdd::Error` instead of asking for gigabytes.
/// The defaults admit every real checkpoint, dataset and photo the pipeline is meant for
/// (DiT-XL/2 and SD-VAE weights, ImageNet JPEGs, Fashion-MNIST); raise them for unusual inputs.
#include <cstdint>

#include "mdd/export.h"

namespace mdd {
namespace io {

/// Limits on what a decoder may produce from its input.
struct MDD_API InputLimits {
  /// Most bytes any decompression (a DEFLATE zip entry, a gzip file) may produce per compressed
  /// byte. DEFLATE itself cannot exceed ~1032:1, so the default only rejects impossible headers;
  /// lower it to refuse "zip bombs" earlier.
  uint64_t max_expansion = 1032;
  /// Most bytes one decompressed entry or file may produce in total (default 16 GiB).
  uint64_t max_decoded_bytes = uint64_t(16) << 30;
  /// Most pixels (width x height) of one decoded image, and of one resize result (default 2^26,
  /// e.g. 8192 x 8192 — above any camera photo; a patched 16 KB header claiming 16000 x 16000 is
  /// refused before decoding).
  uint64_t max_image_pixels = uint64_t(1) << 26;
  /// Most elements of one tensor a file describes, views included (default 2^32).
  uint64_t max_tensor_elements = uint64_t(1) << 32;
  /// Most elements a view may have per element of the storage it reads (a stride-0 "broadcast"
  /// view of one stored number can describe terabytes once materialised). Plain and permuted
  /// tensors have a ratio <= 1.
  uint64_t max_view_expansion = 16;
};

/// The limits in force (process-wide; the defaults until set_input_limits is called).
MDD_API InputLimits input_limits();

/// Replaces the process-wide limits (thread-safe; loads already running keep the old ones).
/// Throws mdd::Error when a limit is 0.
MDD_API void set_input_limits(const InputLimits& limits);

}  // namespace io
}  // namespace mdd
