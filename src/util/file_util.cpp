#include "util/file_util.h"

#include <fcntl.h>
#include <ctime>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <unordered_map>

#include <fmt/format.h>
#include <zlib.h>

#include "mdd/util/error.h"

namespace mdd {

namespace {

// Opens `path` for reading if it is a regular file, else throws; returns the fd and its size.
int open_regular(const std::string& path, uint64_t max_bytes, uint64_t* size) {
  // O_NONBLOCK: opening a FIFO (or a device) must not block until a writer appears; such a file
  // is refused below, and for regular files the flag is cleared before reading.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) throw Error(fmt::format("{}: cannot open ({})", path, std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(fmt::format("{}: not a regular file", path));
  }
  if (uint64_t(st.st_size) > max_bytes) {
    ::close(fd);
    throw Error(fmt::format("{}: {} bytes, more than the {} allowed for this kind of file", path, st.st_size, max_bytes));
  }
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  *size = uint64_t(st.st_size);
  return fd;
}

// Reads exactly `n` bytes from `fd` into `p`; closes `fd` and throws on a short read.
void read_all(int fd, const std::string& path, char* p, uint64_t n) {
  uint64_t done = 0;
  while (done < n) {
    const ssize_t r = ::read(fd, p + done, size_t(n - done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      const int err = errno;
      ::close(fd);
      throw Error(fmt::format("{}: read failed after {} of {} bytes ({})", path, done, n,
                              r == 0 ? "unexpected end of file (did it shrink while being read?)" : std::strerror(err)));
    }
    done += uint64_t(r);
  }
}

}  // namespace

torch::Tensor read_file_bytes(const std::string& path, uint64_t max_bytes) {
  uint64_t size = 0;
  const int fd = open_regular(path, max_bytes, &size);
  auto buffer = torch::empty({int64_t(size)}, torch::kByte);
  read_all(fd, path, static_cast<char*>(buffer.data_ptr()), size);
  ::close(fd);
  return buffer;
}

std::string read_text_file(const std::string& path, uint64_t max_bytes) {
  uint64_t size = 0;
  const int fd = open_regular(path, max_bytes, &size);
  std::string text(size, '\0');
  read_all(fd, path, text.data(), size);
  ::close(fd);
  return text;
}

std::string read_cache_text(const std::string& path, uint64_t max_bytes) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return "";
  try {
    return read_text_file(path, max_bytes);
  } catch (const Error&) {
    return "";
  }
}

std::string file_content_stamp(const std::string& path) {
  uint64_t size = 0;
  int fd = -1;
  try {
    fd = open_regular(path, UINT64_MAX, &size);
  } catch (const Error&) {
    return "missing";  // absent, unreadable or not a regular file: the cache entry is rebuilt
  }
  // A pipeline run asks for the same stamps many times (the init weights of every fine-tune and
  // sample stage, the VAE files in every cache key downstream of the codec): hashing a 2.7 GB DiT-XL
  // each time would cost seconds per stage. The memo is keyed by what any change of the file's
  // bytes changes: device, inode, size, mtime and ctime (ctime cannot be set back by a user; an
  // atomic replace gives a new inode).
  struct stat st {};
  const bool have_stat = ::fstat(fd, &st) == 0;
  const std::string key = have_stat ? fmt::format("{}:{}:{}:{}.{}:{}.{}", uint64_t(st.st_dev), uint64_t(st.st_ino), size,
                                                  int64_t(st.st_mtim.tv_sec), int64_t(st.st_mtim.tv_nsec),
                                                  int64_t(st.st_ctim.tv_sec), int64_t(st.st_ctim.tv_nsec))
                                    : std::string();
  static std::mutex memo_mutex;
  static std::unordered_map<std::string, std::string> memo;
  if (have_stat) {
    std::lock_guard<std::mutex> lock(memo_mutex);
    const auto it = memo.find(key);
    if (it != memo.end()) {
      ::close(fd);
      return it->second;
    }
  }
  std::vector<unsigned char> buf(size_t(1) << 20);
  uLong crc = ::crc32(0L, Z_NULL, 0);
  uint64_t total = 0;
  while (true) {
    const ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      throw Error(fmt::format("{}: read failed while hashing ({})", path, std::strerror(err)));
    }
    if (n == 0) break;
    crc = ::crc32(crc, buf.data(), uInt(n));
    total += uint64_t(n);
  }
  ::close(fd);
  const std::string stamp = fmt::format("{}:{:08x}", total, uint32_t(crc));
  // As git does for its index ("racily clean" entries): a file changed within the last seconds could
  // change again within the same timestamp tick, so only settled files are remembered.
  const int64_t now = int64_t(::time(nullptr));
  const bool settled = have_stat && now - int64_t(st.st_mtim.tv_sec) >= 2 && now - int64_t(st.st_ctim.tv_sec) >= 2;
  if (settled && total == size) {
    std::lock_guard<std::mutex> lock(memo_mutex);
    memo[key] = stamp;
  }
  return stamp;
}

void write_text_file_atomic(const std::string& path, const std::string& text) {
  const auto parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(parent, ec);
    if (ec) throw Error(fmt::format("{}: cannot create the folder ({})", parent.string(), ec.message()));
  }
  AtomicFileWriter w(path);
  w.write(text.data(), text.size());
  w.commit();
}

std::vector<std::string> remove_orphan_temp_files(const std::string& dir) {
  std::vector<std::string> removed;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    const auto at = name.rfind(".tmp.");
    if (at == std::string::npos) continue;
    // "<pid>.<n>" after ".tmp.", digits only.
    const std::string tail = name.substr(at + 5);
    const auto dot = tail.find('.');
    if (dot == std::string::npos || dot == 0 || dot + 1 == tail.size() || dot > 10) continue;
    const std::string pid_s = tail.substr(0, dot), n_s = tail.substr(dot + 1);
    auto digits = [](const std::string& x) { return x.find_first_not_of("0123456789") == std::string::npos; };
    if (!digits(pid_s) || !digits(n_s) || n_s.size() > 10) continue;
    const long pid = std::stol(pid_s);
    if (pid <= 0 || pid == long(::getpid())) continue;
    // kill(pid, 0) fails with ESRCH only when no such process exists; EPERM means it runs (as
    // someone else), so its file is left alone.
    if (::kill(pid_t(pid), 0) == 0 || errno != ESRCH) continue;
    if (!entry.is_regular_file(ec) || entry.is_symlink(ec)) continue;
    if (std::filesystem::remove(entry.path(), ec)) removed.push_back(entry.path().string());
  }
  return removed;
}

AtomicFileWriter::AtomicFileWriter(std::string path) : path_(std::move(path)) {
  static std::atomic<int> counter{0};
  tmp_ = fmt::format("{}.tmp.{}.{}", path_, ::getpid(), counter++);
  // Exclusive and not through a symlink: in a shared run folder another user must not be able to
  // redirect the write by planting a link under the predictable temporary name.
  const int fd = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0) throw Error(fmt::format("{}: cannot create temporary file {} ({})", path_, tmp_, std::strerror(errno)));
  file_ = ::fdopen(fd, "wb");
  if (!file_) {
    const int err = errno;
    ::close(fd);
    std::remove(tmp_.c_str());
    throw Error(fmt::format("{}: cannot open temporary file {} ({})", path_, tmp_, std::strerror(err)));
  }
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
  // The rename lives in the directory: without this fsync a power loss can bring back the old file
  // (or none) although commit() returned.
  const std::string dir = std::filesystem::path(path_).parent_path().string();
  const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace mdd
