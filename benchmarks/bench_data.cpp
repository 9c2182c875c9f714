// Image pipeline throughput: JPEG decode, the ADM training crop (center_crop_arr), the evaluation
// geometry (Resize + CenterCrop), the threaded ImageFolder loader, and the Fashion-MNIST reader.
// The JPEG is an ImageNet-sized (500x375) re-encode of the retina fixture, made at start-up.
#include <benchmark/benchmark.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <stb/stb_image_write.h>

#include "mdd/data/fashion_mnist.h"
#include "mdd/data/image_folder.h"
#include "mdd/data/loader.h"
#include "mdd/io/image.h"

namespace {

namespace fs = std::filesystem;

const std::string& bench_dir() {
  static const std::string dir = [] {
    const fs::path p = fs::temp_directory_path() / "mdd_bench_data";
    fs::remove_all(p);
    fs::create_directories(p);
    return p.string();
  }();
  return dir;
}

std::vector<uint8_t> encode_jpeg(const torch::Tensor& img, int quality) {
  std::vector<uint8_t> out;
  auto sink = [](void* ctx, void* data, int size) {
    auto* v = static_cast<std::vector<uint8_t>*>(ctx);
    v->insert(v->end(), static_cast<uint8_t*>(data), static_cast<uint8_t*>(data) + size);
  };
  const auto c = img.contiguous();
  stbi_write_jpg_to_func(sink, &out, int(c.size(1)), int(c.size(0)), int(c.size(2)), c.data_ptr<uint8_t>(), quality);
  return out;
}

// A 500x375 JPEG (ImageNet's typical size) written once; returns its path.
const std::string& imagenet_like_jpeg() {
  static const std::string path = [] {
    const auto src = mdd::read_image(std::string(MDD_BENCH_DATA_DIR) + "/images/retina_crop.jpg");
    const auto img = mdd::resize(src, 500, 375, mdd::ResampleFilter::Bicubic);
    const auto bytes = encode_jpeg(img, 90);
    const std::string p = bench_dir() + "/imagenet_like.jpg";
    std::ofstream(p, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
    return p;
  }();
  return path;
}

void BM_DecodeJpeg500x375(benchmark::State& state) {
  const std::string& path = imagenet_like_jpeg();
  for (auto _ : state) benchmark::DoNotOptimize(mdd::read_image(path));
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_DecodeJpeg500x375)->Unit(benchmark::kMillisecond);

void BM_CenterCropArr256(benchmark::State& state) {
  const auto img = mdd::read_image(imagenet_like_jpeg());
  for (auto _ : state) benchmark::DoNotOptimize(mdd::center_crop_arr(img, 256));
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_CenterCropArr256)->Unit(benchmark::kMillisecond);

void BM_DecodeAndCenterCropArr256(benchmark::State& state) {
  const std::string& path = imagenet_like_jpeg();
  for (auto _ : state) benchmark::DoNotOptimize(mdd::center_crop_arr(mdd::read_image(path), 256));
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_DecodeAndCenterCropArr256)->Unit(benchmark::kMillisecond);

void BM_ResizeCenterCrop224(benchmark::State& state) {
  const auto img = mdd::read_image(imagenet_like_jpeg());
  for (auto _ : state) benchmark::DoNotOptimize(mdd::center_crop(mdd::resize_shorter(img, 224), 224));
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_ResizeCenterCrop224)->Unit(benchmark::kMillisecond);

void BM_ToTensorNormalize256(benchmark::State& state) {
  const auto img = mdd::center_crop_arr(mdd::read_image(imagenet_like_jpeg()), 256);
  for (auto _ : state) benchmark::DoNotOptimize(mdd::normalize(mdd::to_tensor(img), {0.5}, {0.5}));
  state.SetItemsProcessed(state.iterations());
}
BENCHMARK(BM_ToTensorNormalize256)->Unit(benchmark::kMicrosecond);

// A 2-class folder of 32 JPEGs each; one epoch per iteration, batch 16, ADM crop 256.
const std::string& folder_root() {
  static const std::string root = [] {
    const std::string r = bench_dir() + "/folder";
    const auto bytes = [] {
      std::ifstream f(imagenet_like_jpeg(), std::ios::binary);
      return std::vector<char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    }();
    for (const std::string cls : {"n02086240", "n02088364"}) {
      fs::create_directories(r + "/" + cls);
      for (int k = 0; k < 32; ++k)
        std::ofstream(r + "/" + cls + "/" + std::to_string(k) + ".jpg", std::ios::binary)
            .write(bytes.data(), std::streamsize(bytes.size()));
    }
    return r;
  }();
  return root;
}

void BM_LoaderEpoch(benchmark::State& state) {
  const mdd::ImageFolder folder(folder_root());
  const int64_t workers = state.range(0);
  int64_t images = 0;
  for (auto _ : state) {
    auto loader = mdd::make_image_folder_loader(
        folder, mdd::adm_transform(256), mdd::BatchLoaderOptions().batch_size(16).num_workers(workers).prefetch_batches(4));
    mdd::Batch b;
    while (loader->next(b)) images += b.data.size(0);
  }
  state.SetItemsProcessed(images);
}
BENCHMARK(BM_LoaderEpoch)->Arg(1)->Arg(2)->Arg(4)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_ImageFolderLoad(benchmark::State& state) {
  const mdd::ImageFolder folder(folder_root());
  for (auto _ : state) benchmark::DoNotOptimize(folder.load(mdd::adm_transform(256), state.range(0)));
  state.SetItemsProcessed(state.iterations() * folder.size());
}
BENCHMARK(BM_ImageFolderLoad)->Arg(1)->Arg(2)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_FashionMnistTrain(benchmark::State& state) {
  for (auto _ : state) benchmark::DoNotOptimize(mdd::load_fashion_mnist("/usr/share/datasets/fashion-mnist", "train"));
  state.SetItemsProcessed(state.iterations() * 60000);
}
BENCHMARK(BM_FashionMnistTrain)->Unit(benchmark::kMillisecond)->Iterations(3);

}  // namespace

BENCHMARK_MAIN();
