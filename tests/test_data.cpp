// Data area: Fashion-MNIST reader, class lists, ImageFolder, LatentCache, BatchLoader.
#include <zlib.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <thread>

#include "mdd/data/class_lists.h"
#include "mdd/data/fashion_mnist.h"
#include "mdd/data/image_folder.h"
#include "mdd/data/latent_cache.h"
#include "mdd/data/loader.h"
#include "mdd/io/image.h"
#include "mdd/io/input_limits.h"
#include "mdd/io/safetensors.h"
#include "mdd/util/error.h"
#include "test_util.h"

namespace {

namespace fs = std::filesystem;
const std::string kFashionDir = "/usr/share/datasets/fashion-mnist";

// Expects `fn` to throw mdd::Error whose message contains `needle`.
template <class F>
void expect_error_naming(F&& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected mdd::Error mentioning " << needle;
  } catch (const mdd::Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

// Independent reader: zlib's gzread of the whole file.
std::vector<uint8_t> gz_read_all(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  EXPECT_NE(f, nullptr) << path;
  std::vector<uint8_t> out;
  if (!f) return out;
  uint8_t buf[1 << 16];
  int n;
  while ((n = gzread(f, buf, sizeof(buf))) > 0) out.insert(out.end(), buf, buf + n);
  gzclose(f);
  return out;
}

void write_bytes(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), std::streamsize(bytes.size()));
}

std::vector<uint8_t> file_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

void gz_write(const std::string& path, const std::vector<uint8_t>& raw) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(gzwrite(f, raw.data(), unsigned(raw.size())), int(raw.size()));
  gzclose(f);
}

// ------------------------------------------------------------------ Fashion-MNIST

TEST(FashionMnist, TestSplitMatchesRawIdx) {
  const auto ds = mdd::load_fashion_mnist(kFashionDir, "test");
  ASSERT_EQ(ds.images.sizes(), (std::vector<int64_t>{10000, 28, 28, 1}));
  ASSERT_EQ(ds.labels.sizes(), (std::vector<int64_t>{10000}));
  EXPECT_EQ(ds.images.scalar_type(), torch::kUInt8);
  EXPECT_EQ(ds.labels.scalar_type(), torch::kInt64);
  const auto raw_img = gz_read_all(kFashionDir + "/t10k-images-idx3-ubyte.gz");
  const auto raw_lbl = gz_read_all(kFashionDir + "/t10k-labels-idx1-ubyte.gz");
  ASSERT_EQ(raw_img.size(), 16u + 10000u * 784u);
  ASSERT_EQ(raw_lbl.size(), 8u + 10000u);
  auto expect_img = torch::from_blob(const_cast<uint8_t*>(raw_img.data()) + 16, {10000, 28, 28, 1}, torch::kUInt8);
  auto expect_lbl = torch::from_blob(const_cast<uint8_t*>(raw_lbl.data()) + 8, {10000}, torch::kUInt8).to(torch::kInt64);
  EXPECT_TRUE(torch::equal(ds.images, expect_img));
  EXPECT_TRUE(torch::equal(ds.labels, expect_lbl));
  EXPECT_TRUE(torch::equal(torch::bincount(ds.labels), torch::full({10}, 1000, torch::kInt64)));
  ASSERT_EQ(ds.class_names.size(), 10u);
  EXPECT_EQ(ds.class_names[0], "T-shirt/top");
  EXPECT_EQ(ds.class_names[9], "Ankle boot");
}

TEST(FashionMnist, TrainSplitHistogramAndSpotChecks) {
  const auto ds = mdd::load_fashion_mnist(kFashionDir, "train");
  ASSERT_EQ(ds.images.sizes(), (std::vector<int64_t>{60000, 28, 28, 1}));
  EXPECT_TRUE(torch::equal(torch::bincount(ds.labels), torch::full({10}, 6000, torch::kInt64)));
  const auto raw_img = gz_read_all(kFashionDir + "/train-images-idx3-ubyte.gz");
  const auto raw_lbl = gz_read_all(kFashionDir + "/train-labels-idx1-ubyte.gz");
  ASSERT_EQ(raw_img.size(), 16u + 60000u * 784u);
  for (int64_t i : {0, 1, 12345, 59999}) {
    auto expect = torch::from_blob(const_cast<uint8_t*>(raw_img.data()) + 16 + i * 784, {28, 28, 1}, torch::kUInt8);
    EXPECT_TRUE(torch::equal(ds.images[i], expect)) << i;
    EXPECT_EQ(ds.labels[i].item<int64_t>(), int64_t(raw_lbl[size_t(8 + i)])) << i;
  }
}

TEST(FashionMnist, CorruptAndTruncatedFilesNameTheFile) {
  const std::string dir = mdd_test::tmp_dir("fmnist_corrupt");
  const auto img_gz = file_bytes(kFashionDir + "/t10k-images-idx3-ubyte.gz");
  const auto lbl_gz = file_bytes(kFashionDir + "/t10k-labels-idx1-ubyte.gz");
  const std::string img_path = dir + "/t10k-images-idx3-ubyte.gz";
  const std::string lbl_path = dir + "/t10k-labels-idx1-ubyte.gz";
  write_bytes(lbl_path, lbl_gz);

  // Truncated gzip stream.
  write_bytes(img_path, std::vector<uint8_t>(img_gz.begin(), img_gz.begin() + long(img_gz.size() / 2)));
  expect_error_naming([&] { mdd::load_fashion_mnist(dir, "test"); }, img_path);
  // Flipped bytes inside the deflate data: data error or CRC mismatch.
  auto corrupt = img_gz;
  for (size_t i = corrupt.size() / 2; i < corrupt.size() / 2 + 64; ++i) corrupt[i] ^= 0x5a;
  write_bytes(img_path, corrupt);
  expect_error_naming([&] { mdd::load_fashion_mnist(dir, "test"); }, img_path);
  // Not gzip at all.
  write_bytes(img_path, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20});
  expect_error_naming([&] { mdd::load_fashion_mnist(dir, "test"); }, img_path);

  auto raw = gz_read_all(kFashionDir + "/t10k-images-idx3-ubyte.gz");
  // Wrong magic (a labels file where images are expected).
  auto bad_magic = raw;
  bad_magic[3] = 0x01;  // 2049
  gz_write(img_path, bad_magic);
  expect_error_naming([&] { mdd::load_fashion_mnist(dir, "test"); }, img_path);
  // Valid gzip whose IDX payload is shorter than its header says.
  gz_write(img_path, std::vector<uint8_t>(raw.begin(), raw.end() - 784));
  expect_error_naming([&] { mdd::load_fashion_mnist(dir, "test"); }, img_path);
  // Count mismatch between images and labels.
  gz_write(img_path, raw);
  auto lbl_raw = gz_read_all(kFashionDir + "/t10k-labels-idx1-ubyte.gz");
  lbl_raw.pop_back();
  lbl_raw[7] = uint8_t(lbl_raw[7] - 1);  // 9999 labels
  gz_write(lbl_path, lbl_raw);
  expect_error_naming([&] { mdd::load_fashion_mnist(dir, "test"); }, lbl_path);
  // Label out of range.
  lbl_raw = gz_read_all(kFashionDir + "/t10k-labels-idx1-ubyte.gz");
  lbl_raw[100] = 10;
  gz_write(lbl_path, lbl_raw);
  expect_error_naming([&] { mdd::load_fashion_mnist(dir, "test"); }, lbl_path);
  // Intact copies load again (the checks above are not false alarms).
  write_bytes(lbl_path, lbl_gz);
  gz_write(img_path, raw);
  EXPECT_EQ(mdd::load_fashion_mnist(dir, "test").images.size(0), 10000);

  // A gzip bomb: 64 MB of zeros in a few KB. Inflation stops at the budget (here lowered to a
  // 100:1 expansion), whatever the trailer claims.
  {
    struct Restore {
      mdd::io::InputLimits saved = mdd::io::input_limits();
      ~Restore() { mdd::io::set_input_limits(saved); }
    } restore;
    mdd::io::InputLimits tight = restore.saved;
    tight.max_expansion = 100;
    mdd::io::set_input_limits(tight);
    gz_write(img_path, std::vector<uint8_t>(size_t(64) << 20, 0));
    try {
      mdd::load_fashion_mnist(dir, "test");
      ADD_FAILURE() << "expected mdd::Error";
    } catch (const mdd::Error& e) {
      EXPECT_NE(std::string(e.what()).find("inflates to more than"), std::string::npos) << e.what();
    }
    gz_write(img_path, raw);
  }
  EXPECT_EQ(mdd::load_fashion_mnist(dir, "test").images.size(0), 10000);

  expect_error_naming([&] { mdd::load_fashion_mnist(dir + "/missing", "test"); }, dir + "/missing");
  EXPECT_THROW(mdd::load_fashion_mnist(kFashionDir, "validation"), mdd::Error);
}

// ------------------------------------------------------------------ class lists

TEST(ClassLists, ImageNetIndicesOfTheReferenceSubsets) {
  const auto& s = mdd::imagenet_synsets();
  ASSERT_EQ(s.size(), 1000u);
  EXPECT_TRUE(std::is_sorted(s.begin(), s.end()));
  EXPECT_EQ(std::set<std::string>(s.begin(), s.end()).size(), 1000u);
  // Reference doc §2.4: local id -> synset (ImageNet index), in file order.
  const std::vector<std::pair<std::string, int64_t>> woof = {
      {"n02096294", 193}, {"n02093754", 182}, {"n02111889", 258}, {"n02088364", 162}, {"n02086240", 155},
      {"n02089973", 167}, {"n02087394", 159}, {"n02115641", 273}, {"n02099601", 207}, {"n02105641", 229}};
  const std::vector<std::pair<std::string, int64_t>> nette = {
      {"n01440764", 0},   {"n02102040", 217}, {"n02979186", 482}, {"n03000684", 491}, {"n03028079", 497},
      {"n03394916", 566}, {"n03417042", 569}, {"n03425413", 571}, {"n03445777", 574}, {"n03888257", 701}};
  const std::vector<std::pair<std::string, int64_t>> idc = {
      {"n02869837", 452}, {"n01749939", 64},  {"n02488291", 374}, {"n02107142", 236}, {"n13037406", 993},
      {"n02091831", 176}, {"n04517823", 882}, {"n04589890", 904}, {"n03062245", 503}, {"n01773797", 74}};
  for (const auto& [spec, expect] : std::vector<std::pair<std::string, decltype(woof)>>{
           {"woof", woof}, {"nette", nette}, {"idc", idc}}) {
    const auto list = mdd::spec_classes(spec);
    ASSERT_EQ(list.size(), expect.size()) << spec;
    for (size_t i = 0; i < list.size(); ++i) {
      EXPECT_EQ(list[i], expect[i].first) << spec << " " << i;
      EXPECT_EQ(mdd::imagenet_index(list[i]), expect[i].second) << spec << " " << i;
    }
  }
  EXPECT_EQ(mdd::imagenet_index("n99999999"), -1);
  const auto c100 = mdd::class_list("class100");
  ASSERT_EQ(c100.size(), 100u);
  EXPECT_EQ(std::set<std::string>(c100.begin(), c100.end()).size(), 100u);
  for (const auto& c : c100) EXPECT_GE(mdd::imagenet_index(c), 0) << c;
  // --phase slices; anything but woof/nette reads class100 (data.py).
  const auto woof_all = mdd::class_list("woof");
  EXPECT_EQ(mdd::spec_classes("woof", 5, 1), std::vector<std::string>(woof_all.begin() + 5, woof_all.end()));
  EXPECT_EQ(mdd::spec_classes("none", 10, 1), std::vector<std::string>(c100.begin() + 10, c100.begin() + 20));
  EXPECT_THROW(mdd::spec_classes("woof", 10, 1), mdd::Error);
  EXPECT_THROW(mdd::class_list("cifar"), mdd::Error);
}

// ------------------------------------------------------------------ ImageFolder

// A small PNG whose pixels encode (class, k) so tests can tell files apart.
torch::Tensor tagged_image(int cls, int k, int64_t h = 12, int64_t w = 16) {
  auto img = torch::zeros({h, w, 3}, torch::kUInt8);
  img.select(2, 0).fill_(cls * 20);
  img.select(2, 1).fill_(k);
  return img;
}

std::string make_tree(const std::string& name) {
  const std::string root = mdd_test::tmp_dir(name);
  for (const std::string cls : {"b_cls", "a_cls", "c_cls"}) fs::create_directories(root + "/" + cls);
  for (int k = 0; k < 12; ++k) {  // lexicographic order: 0 1 10 11 2 3 ...
    mdd::write_png(root + "/a_cls/" + std::to_string(k) + ".png", tagged_image(0, k));
    mdd::write_png(root + "/b_cls/" + std::to_string(k) + ".PNG", tagged_image(1, k));  // upper-case extension
  }
  fs::create_directories(root + "/c_cls/sub");
  mdd::write_png(root + "/c_cls/x.png", tagged_image(2, 0));
  mdd::write_png(root + "/c_cls/sub/y.png", tagged_image(2, 1));
  std::ofstream(root + "/c_cls/notes.txt") << "not an image";
  std::ofstream(root + "/README") << "a file in the root";
  return root;
}

TEST(ImageFolder, SortedClassesOrderAndLabels) {
  const std::string root = make_tree("folder_sorted");
  mdd::ImageFolder f(root);
  EXPECT_EQ(f.classes(), (std::vector<std::string>{"a_cls", "b_cls", "c_cls"}));
  ASSERT_EQ(f.size(), 26);
  EXPECT_EQ(fs::path(f.samples()[0].path).filename(), "0.png");
  EXPECT_EQ(fs::path(f.samples()[1].path).filename(), "1.png");
  EXPECT_EQ(fs::path(f.samples()[2].path).filename(), "10.png");
  EXPECT_EQ(f.samples()[12].label, 1);
  // c_cls: files of the class dir itself before those of its sub-folder; .txt ignored.
  EXPECT_EQ(fs::path(f.samples()[24].path).filename(), "x.png");
  EXPECT_EQ(fs::path(f.samples()[25].path).filename(), "y.png");
  // DiT label = index in sorted(os.listdir(root)), which includes the README file.
  EXPECT_EQ(f.dit_labels(), (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(f.imagenet_labels(), (std::vector<int64_t>{-1, -1, -1}));
  const auto labels = f.labels();
  EXPECT_EQ(labels.sum().item<int64_t>(), 12 * 1 + 2 * 2);
  EXPECT_TRUE(torch::equal(f.read(2), tagged_image(0, 10)));
}

TEST(ImageFolder, IpcExplicitClassesAndErrors) {
  const std::string root = make_tree("folder_ipc");
  mdd::ImageFolder f(root, mdd::ImageFolderOptions().classes({"b_cls", "a_cls"}).ipc(3));
  ASSERT_EQ(f.size(), 6);
  // Samples in class-NAME order (a_cls first) with labels from the given order (a_cls = 1).
  EXPECT_EQ(f.samples()[0].label, 1);
  EXPECT_EQ(fs::path(f.samples()[2].path).filename(), "10.png");  // first 3 in lexicographic order
  EXPECT_EQ(f.samples()[3].label, 0);
  EXPECT_EQ(f.dit_labels(), (std::vector<int64_t>{2, 1}));
  const auto data = f.load({}, 2);
  EXPECT_EQ(data.images.sizes(), (std::vector<int64_t>{6, 12, 16, 3}));
  EXPECT_EQ(data.class_names, (std::vector<std::string>{"b_cls", "a_cls"}));
  EXPECT_TRUE(torch::equal(data.images[2], tagged_image(0, 10)));

  EXPECT_THROW(mdd::ImageFolder(root, mdd::ImageFolderOptions().ipc(3)), mdd::Error);  // c_cls has 2
  expect_error_naming([&] { mdd::ImageFolder(root + "/nope"); }, root + "/nope");
  expect_error_naming([&] { mdd::ImageFolder(root, mdd::ImageFolderOptions().classes({"a_cls", "zz"})); }, "zz");
  // Extension filter: only .bmp accepted -> no files.
  EXPECT_THROW(mdd::ImageFolder(root, mdd::ImageFolderOptions().extensions({".bmp"})), mdd::Error);
  // Mixed sizes need a transform; with one they stack.
  mdd::write_png(root + "/a_cls/99.png", tagged_image(0, 99, 20, 30));
  mdd::ImageFolder g(root, mdd::ImageFolderOptions().classes({"a_cls"}));
  EXPECT_THROW(g.load(), mdd::Error);
  const auto cropped = g.load(mdd::adm_transform(8), 3);
  EXPECT_EQ(cropped.images.sizes(), (std::vector<int64_t>{13, 8, 8, 3}));
  const auto eval = g.load(mdd::resize_center_crop_transform(10), 1);
  EXPECT_EQ(eval.images.sizes(), (std::vector<int64_t>{13, 10, 10, 3}));
  // An undecodable image fails the load, naming the file.
  const std::string bad = root + "/a_cls/55.png";
  std::ofstream(bad) << "garbage";
  mdd::ImageFolder h(root, mdd::ImageFolderOptions().classes({"a_cls"}));
  int64_t calls = 0;
  expect_error_naming([&] { h.load(mdd::adm_transform(8), 2, [&](const mdd::Progress&) { ++calls; }); }, bad);
}

TEST(ImageFolder, SpecUsesReferenceClassFileAndImageNetLabels) {
  const std::string root = mdd_test::tmp_dir("folder_spec");
  auto woof = mdd::class_list("woof");
  for (const auto& s : woof) {
    fs::create_directories(root + "/" + s);
    mdd::write_png(root + "/" + s + "/0.png", tagged_image(1, 1));
  }
  fs::create_directories(root + "/n00000001");  // not in the spec: ignored, but shifts DiT labels
  mdd::ImageFolder f(root, mdd::ImageFolderOptions().spec("woof"));
  EXPECT_EQ(f.classes(), woof);
  std::vector<int64_t> expect_inet;
  auto listing = woof;
  listing.push_back("n00000001");
  std::sort(listing.begin(), listing.end());
  std::vector<int64_t> expect_dit;
  for (const auto& s : woof) {
    expect_inet.push_back(mdd::imagenet_index(s));
    expect_dit.push_back(std::find(listing.begin(), listing.end(), s) - listing.begin());
  }
  EXPECT_EQ(f.imagenet_labels(), expect_inet);
  EXPECT_EQ(f.imagenet_labels()[0], 193);
  EXPECT_EQ(f.dit_labels(), expect_dit);
}

// ------------------------------------------------------------------ LatentCache

// A deterministic stand-in for the VAE: mean = 2x2 average pool, logvar = -2 + mean.
class FakeCodec : public mdd::Codec {
 public:
  int64_t encode_calls = 0;
  double logvar_offset = -2.0;
  mdd::DiagonalGaussian encode(const torch::Tensor& images) override {
    ++encode_calls;
    auto m = torch::avg_pool2d(images, 2);
    return mdd::DiagonalGaussian{m, (m + logvar_offset).clamp(-30.0, 20.0)};
  }
  torch::Tensor decode(const torch::Tensor& latents) override {
    return latents.repeat_interleave(2, 2).repeat_interleave(2, 3);
  }
  double scaling_factor() const override { return 0.5; }
  std::vector<int64_t> latent_shape(const std::vector<int64_t>& s) const override { return {s[0], s[1] / 2, s[2] / 2}; }
};

mdd::LabeledImages random_images(int64_t n, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  mdd::LabeledImages d;
  d.images = torch::randint(0, 256, {n, 8, 8, 3}, gen, torch::kInt64).to(torch::kUInt8);
  d.labels = torch::arange(n, torch::kInt64) % 3;
  d.class_names = {"a", "b", "c"};
  return d;
}

TEST(LatentCache, BuildReloadRebuildAndSample) {
  const std::string dir = mdd_test::tmp_dir("latent_cache");
  const std::string path = dir + "/latents.safetensors";
  const auto data = random_images(10, 1);
  FakeCodec codec;
  int64_t progress_calls = 0;
  const auto opts = mdd::LatentCacheOptions().batch_size(4);
  auto cache = mdd::LatentCache::build(path, codec, data, opts, [&](const mdd::Progress& p) {
    ++progress_calls;
    EXPECT_EQ(p.stage, "encode_latents");
  });
  EXPECT_FALSE(cache.loaded_from_disk());
  EXPECT_EQ(codec.encode_calls, 6);  // 3 batches x 2 views
  EXPECT_EQ(progress_calls, 3);
  ASSERT_EQ(cache.mean().sizes(), (std::vector<int64_t>{10, 2, 3, 4, 4}));
  // View 0 = encoder on the [-1, 1] image, view 1 = on its mirror.
  const auto x = mdd::normalize(mdd::to_tensor(data.images), {0.5}, {0.5});
  EXPECT_TRUE(mdd_test::AllClose(cache.mean().select(1, 0), torch::avg_pool2d(x, 2), 0.0));
  EXPECT_TRUE(mdd_test::AllClose(cache.mean().select(1, 1), torch::avg_pool2d(x.flip({3}), 2), 0.0));
  EXPECT_TRUE(mdd_test::AllClose(cache.logvar(), cache.mean() - 2.0, 1e-6));

  // Reload: no encoder calls.
  auto again = mdd::LatentCache::build(path, codec, data, opts);
  EXPECT_TRUE(again.loaded_from_disk());
  EXPECT_EQ(codec.encode_calls, 6);
  EXPECT_TRUE(torch::equal(again.mean(), cache.mean()));
  // Different images (one pixel) or another codec tag: rebuilt.
  auto changed = data;
  changed.images = data.images.clone();
  changed.images[3][0][0][0] = uint8_t(changed.images[3][0][0][0].item<int>() ^ 1);
  EXPECT_FALSE(mdd::LatentCache::build(path, codec, changed, opts).loaded_from_disk());
  EXPECT_FALSE(mdd::LatentCache::build(path, codec, changed, mdd::LatentCacheOptions().codec_tag("other")).loaded_from_disk());
  // A corrupt file is rebuilt, never trusted.
  write_bytes(path, {1, 2, 3});
  EXPECT_FALSE(mdd::LatentCache::build(path, codec, data, opts).loaded_from_disk());
  EXPECT_THROW(mdd::LatentCache::load(dir + "/missing.safetensors"), mdd::Error);

  // sample(): view by rand < 0.5, then eps by randn, from the given generator.
  auto g1 = at::make_generator<at::CPUGeneratorImpl>(42);
  auto idx = torch::tensor({0, 3, 3, 9, 5}, torch::kInt64);
  const auto s = cache.sample(idx, g1);
  auto g2 = at::make_generator<at::CPUGeneratorImpl>(42);
  const auto view = (torch::rand({5}, g2) < 0.5).to(torch::kInt64);
  const auto eps = torch::randn({5, 3, 4, 4}, g2, torch::kFloat32);
  const auto rows = torch::arange(5, torch::kInt64);
  const auto m = cache.mean().index_select(0, idx).index({rows, view});
  const auto lv = cache.logvar().index_select(0, idx).index({rows, view});
  EXPECT_TRUE(mdd_test::AllClose(s, (m + torch::exp(0.5 * lv) * eps) * 0.5, 0.0));
  EXPECT_THROW(cache.sample(torch::tensor({10}, torch::kInt64), g1), mdd::Error);
}

TEST(LatentCache, FlipProbabilityIsHalf) {
  const std::string dir = mdd_test::tmp_dir("latent_cache_flip");
  auto data = random_images(1, 2);
  FakeCodec codec;
  codec.logvar_offset = -60.0;  // clamped to -30: std = exp(-15), so noise is negligible
  auto cache = mdd::LatentCache::build(dir + "/c.safetensors", codec, data);
  // With logvar = -30 noise is negligible, so a draw reveals its view.
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  auto idx = torch::zeros({4000}, torch::kInt64);
  auto s = cache.sample(idx, gen) / 0.5;
  auto d0 = (s - cache.mean()[0][0]).abs().flatten(1).amax(1);
  auto d1 = (s - cache.mean()[0][1]).abs().flatten(1).amax(1);
  const double frac_flipped = (d1 < d0).to(torch::kFloat64).mean().item<double>();
  EXPECT_NEAR(frac_flipped, 0.5, 0.04);
}

// ------------------------------------------------------------------ BatchLoader

std::vector<int64_t> collect_epoch(mdd::BatchLoader& loader, std::vector<int64_t>* sizes = nullptr) {
  std::vector<int64_t> seen;
  mdd::Batch b;
  while (loader.next(b)) {
    EXPECT_EQ(b.data.size(0), b.indices.size(0));
    for (int64_t i = 0; i < b.indices.size(0); ++i) {
      const int64_t idx = b.indices[i].item<int64_t>();
      seen.push_back(idx);
      EXPECT_EQ(b.data[i][0].item<int64_t>(), idx);           // the sample of that index
      EXPECT_EQ(b.labels[i].item<int64_t>(), idx % 5);
    }
    if (sizes) sizes->push_back(b.data.size(0));
  }
  return seen;
}

TEST(BatchLoader, DeterministicOrderIndependentOfWorkers) {
  const int64_t n = 37;
  auto labels = torch::arange(n, torch::kInt64) % 5;
  auto jitter = [](int64_t i) {
    // Uneven work so batches finish out of order.
    std::this_thread::sleep_for(std::chrono::microseconds((i * 7919) % 997));
    return torch::full({2}, i, torch::kInt64);
  };
  mdd::BatchLoader a(n, jitter, labels, mdd::BatchLoaderOptions().batch_size(8).seed(3).num_workers(1));
  mdd::BatchLoader b(n, jitter, labels, mdd::BatchLoaderOptions().batch_size(8).seed(3).num_workers(4).prefetch_batches(2));
  std::vector<int64_t> sizes;
  const auto ea = collect_epoch(a, &sizes);
  const auto eb = collect_epoch(b);
  EXPECT_EQ(ea, eb);
  EXPECT_EQ(ea, a.order(0));
  EXPECT_EQ(sizes, (std::vector<int64_t>{8, 8, 8, 8, 5}));
  auto sorted = ea;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> iota(n);
  std::iota(iota.begin(), iota.end(), 0);
  EXPECT_EQ(sorted, iota);
  EXPECT_NE(ea, iota);  // shuffled
  a.start_epoch(1);
  const auto e1 = collect_epoch(a);
  EXPECT_NE(e1, ea);
  EXPECT_EQ(e1, b.order(1));
  // Another seed, another order; no shuffle, identity; drop_last.
  mdd::BatchLoader c(n, jitter, labels, mdd::BatchLoaderOptions().batch_size(8).seed(4));
  EXPECT_NE(c.order(0), ea);
  mdd::BatchLoader d(n, jitter, labels, mdd::BatchLoaderOptions().batch_size(8).shuffle(false).drop_last(true));
  EXPECT_EQ(d.batches_per_epoch(), 4);
  auto ed = collect_epoch(d);
  EXPECT_EQ(ed, std::vector<int64_t>(iota.begin(), iota.begin() + 32));
}

TEST(BatchLoader, ErrorsReachTheConsumerAndShutdownIsClean) {
  auto fn = [](int64_t i) {
    if (i == 13) throw std::runtime_error("boom at 13");
    return torch::full({1}, i, torch::kInt64);
  };
  mdd::BatchLoader loader(20, fn, {}, mdd::BatchLoaderOptions().batch_size(4).shuffle(false).num_workers(3));
  mdd::Batch b;
  for (int k = 0; k < 3; ++k) ASSERT_TRUE(loader.next(b));
  EXPECT_FALSE(b.labels.defined());
  expect_error_naming([&] { loader.next(b); }, "sample 13");
  // Destroying loaders mid-epoch (workers blocked on the prefetch bound) must not hang.
  for (int r = 0; r < 5; ++r) {
    mdd::BatchLoader l(1000, [](int64_t i) { return torch::full({4}, i); }, {},
                       mdd::BatchLoaderOptions().batch_size(2).num_workers(4).prefetch_batches(1));
    ASSERT_TRUE(l.next(b));
  }
  EXPECT_THROW(mdd::BatchLoader(5, fn, torch::zeros({4}, torch::kInt64)), mdd::Error);
  EXPECT_THROW(mdd::BatchLoader(5, fn, {}, mdd::BatchLoaderOptions().batch_size(0)), mdd::Error);
}

TEST(BatchLoader, ImageFolderLoaderDecodesAndPropagatesBadFiles) {
  const std::string root = make_tree("folder_loader");
  mdd::ImageFolder f(root, mdd::ImageFolderOptions().classes({"a_cls", "b_cls"}));
  auto loader = mdd::make_image_folder_loader(f, mdd::adm_transform(8), mdd::BatchLoaderOptions().batch_size(5).seed(1));
  mdd::Batch b;
  int64_t total = 0;
  while (loader->next(b)) {
    EXPECT_EQ(b.data.sizes().slice(1), (std::vector<int64_t>{8, 8, 3}));
    for (int64_t i = 0; i < b.indices.size(0); ++i)
      EXPECT_EQ(b.labels[i].item<int64_t>(), f.samples()[size_t(b.indices[i].item<int64_t>())].label);
    total += b.data.size(0);
  }
  EXPECT_EQ(total, 24);
  std::ofstream(root + "/a_cls/5.png", std::ios::trunc) << "corrupted";
  auto bad = mdd::make_image_folder_loader(f, {}, mdd::BatchLoaderOptions().batch_size(24).shuffle(false));
  expect_error_naming([&] { bad->next(b); }, root + "/a_cls/5.png");
}

}  // namespace
