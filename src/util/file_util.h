#pragma once
// Internal file helpers shared by the readers and writers (not installed).
#include <cstdio>
#include <cstdint>
#include <string>
#include <vector>

#include <torch/types.h>

namespace mdd {

/// Reads a whole file into one uint8 CPU tensor with a single read; throws mdd::Error naming the file.
/// Only regular files are read (a FIFO or device named like a data file is refused, never waited on);
/// a file larger than `max_bytes` is refused before anything is allocated.
torch::Tensor read_file_bytes(const std::string& path, uint64_t max_bytes = UINT64_MAX);

/// A whole (small) text file — configs, sidecars, signatures — with the same rules as
/// read_file_bytes and a 64 MiB default cap.
std::string read_text_file(const std::string& path, uint64_t max_bytes = uint64_t(64) << 20);

/// A cache file of an earlier run (signature, cached evaluation): its text, or "" when it is absent
/// or cannot be read. Callers treat "" as "no cache" and rebuild, so a damaged cache never stops a run.
std::string read_cache_text(const std::string& path, uint64_t max_bytes = uint64_t(64) << 20);

/// Content identity of a file for cache keys: "<size>:<crc32 hex>" (zlib's CRC-32 over every byte,
/// streamed), "missing" when it cannot be opened. Unlike size + mtime it survives a fresh clone or
/// a copy, and it changes when the bytes do. Memoised per process by (device, inode, size, mtime,
/// ctime) once the file has not changed for two seconds, so asking again for an unchanged file costs
/// one stat.
std::string file_content_stamp(const std::string& path);

/// Writes a small text file (sidecar, signature, resolved config, report) atomically with
/// AtomicFileWriter, creating the parent folders first; throws mdd::Error naming the folder or file.
void write_text_file_atomic(const std::string& path, const std::string& text);

/// Temporary files that killed writers left in `dir`: names `<file>.tmp.<pid>.<n>` whose writer
/// process `<pid>` no longer runs on this machine. Removes them and returns their paths (for the
/// caller's log). A missing `dir` gives an empty list.
std::vector<std::string> remove_orphan_temp_files(const std::string& dir);

/// Writes a file atomically: bytes go to `<path>.tmp.<pid>.<n>` in the same directory, created
/// exclusively (O_EXCL | O_NOFOLLOW: an existing file or a planted symlink of that name is an error,
/// never followed), which commit() flushes, fsyncs, renames over `path` and then makes durable by
/// fsyncing the directory (a rename is only on disk once its directory is). Destroyed without
/// commit() the temporary is removed and `path` is untouched.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::string path);
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
  void write(const void* data, size_t size);
  void commit();

 private:
  std::string path_, tmp_;
  std::FILE* file_ = nullptr;
};

}  // namespace mdd
