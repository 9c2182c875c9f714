#include "util/file_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "mdd/util/error.h"

namespace mdd {

torch::Tensor read_file_bytes(const std::string& path) {
  // O_NONBLOCK: opening a FIFO (or a device) must not block until a writer appears; such a file
  // is refused below, and for regular files the flag is cleared before reading.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) throw Error(fmt::format("{}: cannot open ({})", path, std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(fmt::format("{}: not a regular file", path));
  }
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  auto buffer = torch::empty({int64_t(st.st_size)}, torch::kByte);
  auto* p = static_cast<char*>(buffer.data_ptr());
  size_t done = 0;
  while (done < size_t(st.st_size)) {
    const ssize_t n = ::read(fd, p + done, size_t(st.st_size) - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = errno;
      ::close(fd);
      throw Error(fmt::format("{}: read failed after {} of {} bytes ({})", path, done, st.st_size,
                              n == 0 ? "unexpected end of file" : std::strerror(err)));
    }
    done += size_t(n);
  }
  ::close(fd);
  return buffer;
}

AtomicFileWriter::AtomicFileWriter(std::string path) : path_(std::move(path)) {
  static std::atomic<int> counter{0};
  tmp_ = fmt::format("{}.tmp.{}.{}", path_, ::getpid(), counter++);
  file_ = std::fopen(tmp_.c_str(), "wb");
  if (!file_) throw Error(fmt::format("{}: cannot create temporary file {} ({})", path_, tmp_, std::strerror(errno)));
}

AtomicFileWriter::~AtomicFileWriter() {
  if (file_) {
    std::fclose(file_);
    std::remove(tmp_.c_str());
  }
}

void AtomicFileWriter::write(const void* data, size_t size) {
  if (size && std::fwrite(data, 1, size, file_) != size)
    throw Error(fmt::format("{}: write failed ({})", path_, std::strerror(errno)));
}

void AtomicFileWriter::commit() {
  if (std::fflush(file_) != 0 || ::fsync(fileno(file_)) != 0)
    throw Error(fmt::format("{}: flush failed ({})", path_, std::strerror(errno)));
  std::fclose(file_);
  file_ = nullptr;
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp_.c_str());
    throw Error(fmt::format("{}: cannot rename temporary file into place ({})", path_, std::strerror(err)));
  }
}

}  // namespace mdd
