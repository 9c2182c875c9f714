#pragma once
// Internal (not installed): the one rule by which pipeline stages reuse, resume or set aside their
// earlier work. Every stage of run_distill goes through these two functions.
#include <optional>
#include <string>

#include "mdd/io/safetensors.h"
#include "mdd/util/progress.h"

namespace mdd::detail {

/// The stage output `path`, loaded, when it exists and its safetensors metadata "signature" equals
/// `signature`: the stage is done and is reused (the caller gets the file it already had to read in
/// full to validate it). An output that cannot be read (truncated, corrupt) is reported through
/// `log` and treated as absent, so the stage is redone — not a fatal error, and nothing is deleted
/// (the new output replaces it atomically).
std::optional<io::SafeTensors> load_stage_output(const std::string& path, const std::string& signature,
                                                 const LogFn& log);

/// Makes `<dir>/checkpoints` safe to resume for a stage whose resumable identity is
/// `resume_signature`, recorded in `<dir>/signature.json`:
/// - same recorded signature (and not `force`): nothing changes, the trainer resumes;
/// - another signature, no signature file beside existing checkpoints, or `force`: the old
///   checkpoints are moved (never deleted) to `<dir>/superseded/<UTC time>-checkpoints`, reported
///   through `log`, and the new signature is written;
/// - a signature file that exists but cannot be read: mdd::Error. A transient read error must
///   not cost the training state it guards.
void prepare_stage_checkpoints(const std::string& dir, const std::string& resume_signature, bool force,
                               const LogFn& log);

}  // namespace mdd::detail
