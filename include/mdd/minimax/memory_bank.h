#pragma once
/// \file
/// Per-class FIFO memory of latents: the "real" and "generated" (pseudo) memories of Minimax
/// Diffusion (reference: train_dit.py:229-230, 270-276).

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include <torch/types.h>

#include "mdd/export.h"

namespace mdd {

/// A per-class FIFO of detached tensors with a fixed capacity per class.
///
/// Each class owns a preallocated ring buffer `[capacity, D]` (D = numel of one item). It is
/// allocated on the first push into that class, with the dtype and device of that push, and is
/// never reallocated afterwards, so a training step costs one in-place copy per pushed item and no
/// allocation. The item shape is fixed by the first push into the bank; later pushes must match it.
///
/// Alongside each slot the bank caches the item's L2 norm (computed in float64 at push time), so
/// `minimax_loss` never renormalises the bank. Items are stored detached: gradients never flow
/// into the memory (the reference stores `tensor.detach()`).
///
/// The ring fills slots 0, 1, ... first; once full, the oldest slot is overwritten. Hence slots
/// `0..size-1` are always the valid ones, and the logical (oldest-first) index `i` lives in
/// physical slot `(head + i) % capacity`.
class MDD_API MemoryBank {
 public:
  /// A bank of `num_classes` empty FIFOs holding at most `capacity` items each (both > 0).
  MemoryBank(int64_t num_classes, int64_t capacity);

  /// Appends `items[i]` to the FIFO of class `labels[i]`, in batch order, dropping the oldest
  /// entries beyond `capacity` (train_dit.py: `extend` then `pop(0)` while too long).
  /// `items` is `[N, ...]`, `labels` an integer tensor `[N]` (any device). Items are detached and
  /// converted to the bank's dtype/device (fixed by the first push). Throws `mdd::Error` on a
  /// label out of range, a length mismatch, an item shape different from the first push, or a
  /// non-finite item (NaN/Inf would poison every later cosine).
  void push(const torch::Tensor& items, const torch::Tensor& labels);

  /// The items of class `label`, oldest first, as a new tensor `[size, ...]` (a copy: changing it
  /// does not change the bank). Empty (`[0, ...item shape]`, or `[0]` before the first push) if none.
  torch::Tensor get(int64_t label) const;

  /// Number of items currently held for class `label` (0..capacity).
  int64_t size(int64_t label) const;

  /// Maximum number of items per class.
  int64_t capacity() const;

  /// Number of classes (valid labels are 0..num_classes-1).
  int64_t num_classes() const;

  /// Shape of one item (empty before the first push).
  const std::vector<int64_t>& item_shape() const;

  /// Number of elements of one item (0 before the first push).
  int64_t item_numel() const;

  /// Drops every item (keeps the allocated ring buffers and the item shape).
  void clear();

  // ---- raw access for kernels (minimax_loss); read-only by contract --------------------------

  /// The ring storage of class `label`, flattened `[capacity, item_numel]` (undefined tensor if
  /// the class was never pushed). Only slots `0..size-1` hold data; see `head`.
  torch::Tensor storage(int64_t label) const;

  /// Cached L2 norms of the ring slots of class `label`, float64 `[capacity]` on the bank's
  /// device (undefined if the class was never pushed).
  torch::Tensor norms(int64_t label) const;

  /// Physical slot of the oldest item of class `label` (0 while the FIFO is not yet full).
  int64_t head(int64_t label) const;

  /// Physical slot of the logical (oldest-first) index `index` of class `label`.
  int64_t slot(int64_t label, int64_t index) const;

  // ---- checkpointing ---------------------------------------------------------------------------

  /// The bank's content as named tensors (for `io::save_safetensors` / checkpoints):
  /// `"num_classes"`, `"capacity"` (int64 scalars) and `"class.<c>"` = `get(c)` for every
  /// non-empty class, each prefixed by `prefix`.
  std::map<std::string, torch::Tensor> state(const std::string& prefix = "") const;

  /// Replaces the content with one produced by `state(prefix)` (keys without that prefix are
  /// ignored). Throws `mdd::Error` if num_classes/capacity differ from this bank's, a class key is
  /// malformed or out of range, or a class holds more than `capacity` items.
  void load_state(const std::map<std::string, torch::Tensor>& state, const std::string& prefix = "");

 private:
  struct Ring {
    torch::Tensor data;   // [capacity, D]
    torch::Tensor norms;  // float64 [capacity]
    int64_t count = 0;    // valid items
    int64_t next = 0;     // slot the next push writes
  };
  void check_label(int64_t label, const char* what) const;

  int64_t num_classes_;
  int64_t capacity_;
  std::vector<int64_t> item_shape_;
  int64_t item_numel_ = 0;
  bool has_layout_ = false;
  torch::ScalarType dtype_ = torch::kFloat;
  torch::Device device_ = torch::kCPU;
  std::vector<Ring> rings_;
};

}  // namespace mdd
