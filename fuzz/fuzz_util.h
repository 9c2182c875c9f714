#pragma once
// Shared by the libFuzzer targets: scratch files on a RAM-backed folder and the one rule every
// target checks — untrusted bytes may only ever produce mdd::Error.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>

namespace mdd_fuzz {

/// A per-process scratch folder (under /dev/shm when it exists: the loaders read real files).
inline const std::string& scratch_dir() {
  static const std::string dir = [] {
    const std::string base = std::filesystem::is_directory("/dev/shm") ? "/dev/shm" : "/tmp";
    const std::string d = base + "/mdd-fuzz-" + std::to_string(::getpid());
    std::filesystem::create_directories(d);
    return d;
  }();
  return dir;
}

/// Writes `data` to `<scratch>/<name>` and returns the path.
inline std::string write_file(const std::string& name, const uint8_t* data, size_t size) {
  const std::string path = scratch_dir() + "/" + name;
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (size) std::fwrite(data, 1, size, f);
  std::fclose(f);
  return path;
}

}  // namespace mdd_fuzz
