#include "mdd/data/image_folder.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <filesystem>
#include <mutex>
#include <thread>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "mdd/data/class_lists.h"
#include "mdd/io/image.h"
#include "mdd/util/error.h"

namespace mdd {
namespace fs = std::filesystem;

namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return char(std::tolower(c)); });
  return s;
}

bool has_extension(const std::string& name, const std::vector<std::string>& exts_lower) {
  const std::string l = lower(name);
  for (const auto& e : exts_lower)
    if (l.size() >= e.size() && l.compare(l.size() - e.size(), e.size(), e) == 0) return true;
  return false;
}

bool is_dir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec);  // follows symlinks, like os.walk(followlinks=True) / entry.is_dir()
}

std::vector<std::string> list_names(const fs::path& dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) names.push_back(it->path().filename().string());
  if (ec) throw Error(fmt::format("{}: cannot list directory ({})", dir.string(), ec.message()));
  std::sort(names.begin(), names.end());
  return names;
}

// torchvision make_dataset for one class: sorted(os.walk(class_dir)) visits directories in sorted
// path-string order, and files in sorted name order inside each.
std::vector<std::string> class_files(const fs::path& class_dir, const std::vector<std::string>& exts_lower) {
  std::vector<std::string> dirs{class_dir.string()};
  for (size_t i = 0; i < dirs.size(); ++i) {
    if (dirs.size() > 1000000) throw Error(fmt::format("{}: too many sub-directories (symlink loop?)", class_dir.string()));
    for (const auto& name : list_names(dirs[i])) {
      const fs::path p = fs::path(dirs[i]) / name;
      if (is_dir(p)) dirs.push_back(p.string());
    }
  }
  std::sort(dirs.begin(), dirs.end());
  std::vector<std::string> files;
  for (const auto& d : dirs)
    for (const auto& name : list_names(d)) {
      const fs::path p = fs::path(d) / name;
      if (!is_dir(p) && has_extension(name, exts_lower)) files.push_back(p.string());
    }
  return files;
}

}  // namespace

ImageTransform adm_transform(int64_t size) {
  if (size <= 0) throw Error(fmt::format("adm_transform: size must be positive, got {}", size));
  return [size](const torch::Tensor& img) { return center_crop_arr(img, size); };
}

ImageTransform resize_center_crop_transform(int64_t size) {
  if (size <= 0) throw Error(fmt::format("resize_center_crop_transform: size must be positive, got {}", size));
  return [size](const torch::Tensor& img) { return center_crop(resize_shorter(img, size), size); };
}

ImageFolder::ImageFolder(std::string root, ImageFolderOptions options) : root_(std::move(root)), options_(std::move(options)) {
  if (!is_dir(root_)) throw Error(fmt::format("ImageFolder: root {} is not a directory", root_));
  if (options_.ipc() < 0) throw Error(fmt::format("ImageFolder {}: ipc must be >= 0, got {}", root_, options_.ipc()));
  const std::vector<std::string> listing = list_names(root_);  // files too, as os.listdir
  if (!options_.classes().empty()) {
    classes_ = options_.classes();
  } else if (!options_.spec().empty()) {
    classes_ = spec_classes(options_.spec(), options_.nclass(), options_.phase());
  } else {
    for (const auto& name : listing)
      if (is_dir(fs::path(root_) / name)) classes_.push_back(name);
    if (classes_.empty()) throw Error(fmt::format("ImageFolder: no class folders in {}", root_));
  }
  {
    auto sorted = classes_;
    std::sort(sorted.begin(), sorted.end());
    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end())
      throw Error(fmt::format("ImageFolder {}: duplicate class names in [{}]", root_, fmt::join(classes_, ", ")));
  }
  std::vector<std::string> exts;
  for (const auto& e : options_.extensions()) exts.push_back(lower(e));

  // Per label file lists; samples are emitted in sorted class-name order (make_dataset).
  std::vector<std::vector<std::string>> files(classes_.size());
  for (size_t c = 0; c < classes_.size(); ++c) {
    const fs::path dir = fs::path(root_) / classes_[c];
    if (!is_dir(dir)) throw Error(fmt::format("ImageFolder: class folder {} does not exist", dir.string()));
    files[c] = class_files(dir, exts);
    if (files[c].empty())
      throw Error(fmt::format("ImageFolder: class folder {} holds no file with extension in [{}]", dir.string(),
                              fmt::join(options_.extensions(), ", ")));
    const auto it = std::find(listing.begin(), listing.end(), classes_[c]);
    dit_labels_.push_back(int64_t(it - listing.begin()));
  }
  if (options_.ipc() > 0) {
    size_t smallest = files[0].size();
    std::string smallest_name = classes_[0];
    for (size_t c = 0; c < files.size(); ++c)
      if (files[c].size() < smallest) {
        smallest = files[c].size();
        smallest_name = classes_[c];
      }
    if (size_t(options_.ipc()) > smallest)
      throw Error(fmt::format("ImageFolder {}: ipc {} exceeds the smallest class ({} has {} images)", root_,
                              options_.ipc(), smallest_name, smallest));
  }
  std::vector<size_t> order(classes_.size());
  for (size_t c = 0; c < order.size(); ++c) order[c] = c;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return classes_[a] < classes_[b]; });
  for (size_t c : order) {
    size_t n = files[c].size();
    if (options_.ipc() > 0) n = std::min(n, size_t(options_.ipc()));
    for (size_t i = 0; i < n; ++i) samples_.push_back({files[c][i], int64_t(c)});
  }
}

torch::Tensor ImageFolder::labels() const {
  auto out = torch::empty({size()}, torch::kInt64);
  auto* p = out.data_ptr<int64_t>();
  for (size_t i = 0; i < samples_.size(); ++i) p[i] = samples_[i].label;
  return out;
}

std::vector<int64_t> ImageFolder::imagenet_labels() const {
  std::vector<int64_t> out;
  for (const auto& c : classes_) out.push_back(imagenet_index(c));
  return out;
}

torch::Tensor ImageFolder::read(int64_t index) const {
  if (index < 0 || index >= size())
    throw Error(fmt::format("ImageFolder {}: index {} out of range [0, {})", root_, index, size()));
  return read_image(samples_[size_t(index)].path, options_.channels());
}

LabeledImages ImageFolder::load(const ImageTransform& transform, int64_t num_threads, const ProgressFn& progress) const {
  const int64_t n = size();
  if (num_threads <= 0) num_threads = std::max<int64_t>(1, int64_t(std::thread::hardware_concurrency()));
  num_threads = std::min(num_threads, std::max<int64_t>(1, n));
  std::vector<torch::Tensor> images(static_cast<size_t>(n));
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;
  std::mutex mu;
  std::condition_variable cv;
  const auto t0 = std::chrono::steady_clock::now();

  auto worker = [&] {
    for (;;) {
      const int64_t i = next.fetch_add(1);
      if (i >= n || failed.load()) break;
      try {
        torch::Tensor img = read(i);
        if (transform) {
          try {
            img = transform(img);
          } catch (const std::exception& e) {
            throw Error(fmt::format("{}: transform failed: {}", samples_[size_t(i)].path, e.what()));
          }
        }
        if (img.scalar_type() != torch::kUInt8 || img.dim() != 3)
          throw Error(fmt::format("{}: transform must return a uint8 [H, W, C] image, got {} with {} dims",
                                  samples_[size_t(i)].path, c10::toString(img.scalar_type()), img.dim()));
        images[size_t(i)] = img.contiguous();
      } catch (...) {
        std::lock_guard<std::mutex> lock(mu);
        if (!error) error = std::current_exception();
        failed = true;
      }
      done.fetch_add(1);
      cv.notify_one();
    }
    cv.notify_one();
  };
  std::vector<std::thread> threads;
  for (int64_t t = 0; t < num_threads; ++t) threads.emplace_back(worker);
  {
    // The calling thread reports progress (callbacks never run on worker threads).
    std::unique_lock<std::mutex> lock(mu);
    int64_t reported = -1;
    while (!failed.load() && done.load() < n) {
      cv.wait_for(lock, std::chrono::milliseconds(200));
      const int64_t d = done.load();
      if (progress && d != reported) {
        reported = d;
        lock.unlock();
        progress({"load_images", d, n, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()});
        lock.lock();
      }
    }
  }
  for (auto& t : threads) t.join();
  if (error) std::rethrow_exception(error);

  LabeledImages out;
  out.class_names = classes_;
  out.labels = labels();
  if (n == 0) {
    out.images = torch::empty({0, 0, 0, options_.channels()}, torch::kUInt8);
    return out;
  }
  for (int64_t i = 1; i < n; ++i)
    if (images[size_t(i)].sizes() != images[0].sizes())
      throw Error(fmt::format("ImageFolder {}: {} gives an image of shape [{}] but {} gives [{}]; use a transform that "
                              "crops to a common size",
                              root_, samples_[size_t(i)].path, fmt::join(images[size_t(i)].sizes(), ", "),
                              samples_[0].path, fmt::join(images[0].sizes(), ", ")));
  out.images = torch::stack(images);
  return out;
}

}  // namespace mdd
