#pragma once
// Internal file helpers shared by the readers and writers (not installed).
#include <cstdio>
#include <string>

#include <torch/types.h>

namespace mdd {

/// Reads a whole file into one uint8 CPU tensor with a single read; throws mdd::Error naming the file.
torch::Tensor read_file_bytes(const std::string& path);

/// Writes a file atomically: bytes go to `<path>.tmp.<pid>.<n>` in the same directory, which
/// commit() flushes, fsyncs and renames over `path`. Destroyed without commit() the temporary is
/// removed and `path` is untouched.
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
