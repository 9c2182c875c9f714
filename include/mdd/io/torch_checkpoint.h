#pragma once
/// \file
/// Safe reading of PyTorch `torch.save` checkpoints (zip format) without executing pickled code.

#include <string>

#include "mdd/export.h"
#include "mdd/io/safetensors.h"

namespace mdd {
namespace io {

/// Reads the tensors of a `torch.save` zip file (PyTorch >= 1.6 format) with a restricted
/// unpickler: only tensor rebuilds, (Ordered)dicts, lists, tuples and primitives are constructed.
/// Globals that merely describe data (e.g. `argparse.Namespace`) become inert placeholders; a
/// global that could execute code (os.system, builtins.eval, ...) is refused with `mdd::Error` and
/// is never called. Nested dicts are flattened with dotted keys.
/// For a training checkpoint (a dict of dicts such as {model, ema, opt, args}) `entry` picks the
/// sub-dict; "" picks "ema" if present, else "model", else the top-level dict itself. A named entry
/// that is absent (or not a dict) throws `mdd::Error` listing the available entries.
/// The file is read once; returned tensors are CPU views of it (no copy), and tensors that shared a
/// storage in Python share memory here too. Legacy (pre-1.6) and TorchScript archives, truncated or
/// corrupt zips (offsets, sizes and CRC-32 are checked), missing storage records and tensor extents
/// beyond their storage all throw `mdd::Error` naming the file. See docs/weights.md.
MDD_API TensorMap load_torch_checkpoint(const std::string& path, const std::string& entry = "");

/// Loads weights from a safetensors or torch.save file, chosen by the file's content (not its
/// name). For torch.save files this is `load_torch_checkpoint(path)`.
MDD_API TensorMap load_weights(const std::string& path);

}  // namespace io
}  // namespace mdd
