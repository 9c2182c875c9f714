// load_torch_checkpoint / load_weights against fixtures written by tests/data/make_pt_fixtures.py
// (PyTorch 1.13's own torch.save), with expected values in companion .safetensors files.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>

#include "mdd/io/input_limits.h"
#include "mdd/io/safetensors.h"
#include "mdd/io/torch_checkpoint.h"
#include "mdd/io/weight_entry.h"
#include "mdd/util/error.h"
#include "test_util.h"

using namespace mdd;

namespace {

const char* kMarker = "/tmp/mdd_pt_fixture_pwned_marker";  // must match make_pt_fixtures.py

std::string pt(const std::string& name) { return mdd_test::data_path("pt/" + name); }

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void spit(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

// Exact comparison: same keys, dtypes, shapes and bit-identical values.
void expect_same(const io::TensorMap& actual, const io::TensorMap& expected) {
  ASSERT_EQ(actual.size(), expected.size());
  for (const auto& [k, e] : expected) {
    auto it = actual.find(k);
    ASSERT_NE(it, actual.end()) << "missing key " << k;
    const auto& a = it->second;
    EXPECT_EQ(a.scalar_type(), e.scalar_type()) << k;
    EXPECT_EQ(a.sizes(), e.sizes()) << k;
    EXPECT_TRUE(torch::equal(a, e)) << k;
    EXPECT_FALSE(a.requires_grad()) << k;
  }
}

// Tensors of `all` whose key starts with "<entry>." with the prefix removed.
io::TensorMap sub_map(const io::TensorMap& all, const std::string& entry) {
  io::TensorMap out;
  const std::string p = entry + ".";
  for (const auto& [k, v] : all)
    if (k.compare(0, p.size(), p) == 0) out.emplace(k.substr(p.size()), v);
  return out;
}

// Runs `fn`, which must throw mdd::Error whose message contains `needle`.
template <typename F>
::testing::AssertionResult ThrowsWith(F&& fn, const std::string& needle) {
  try {
    fn();
  } catch (const Error& e) {
    if (std::string(e.what()).find(needle) == std::string::npos)
      return ::testing::AssertionFailure() << "message lacks '" << needle << "': " << e.what();
    return ::testing::AssertionSuccess() << e.what();
  } catch (const std::exception& e) {
    return ::testing::AssertionFailure() << "threw a non-mdd exception: " << e.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

}  // namespace

TEST(TorchCheckpoint, StateDictMixedDtypesExact) {
  const auto expected = mdd_test::golden("pt/state_dict.expected.safetensors");
  ASSERT_EQ(expected.size(), 13u);
  expect_same(io::load_torch_checkpoint(pt("state_dict.pt")), expected);
}

TEST(TorchCheckpoint, DeflatedAndZip64ArchivesLoad) {
  const auto expected = mdd_test::golden("pt/state_dict.expected.safetensors");
  expect_same(io::load_torch_checkpoint(pt("deflated.pt")), expected);
  expect_same(io::load_torch_checkpoint(pt("zip64.pt")), expected);
}

TEST(TorchCheckpoint, TrainingCheckpointEntrySelection) {
  const auto expected = mdd_test::golden("pt/train_ckpt.expected.safetensors");
  const auto ema = sub_map(expected, "ema"), model = sub_map(expected, "model"), opt = sub_map(expected, "opt");
  ASSERT_EQ(ema.size(), 4u);
  ASSERT_EQ(opt.size(), 12u);
  // "" prefers ema (what DiT/Minimax find_model samples from); the argparse.Namespace under "args"
  // is an inert placeholder and does not disturb loading.
  expect_same(io::load_torch_checkpoint(pt("train_ckpt.pt")), ema);
  expect_same(io::load_torch_checkpoint(pt("train_ckpt.pt"), "ema"), ema);
  expect_same(io::load_torch_checkpoint(pt("train_ckpt.pt"), "model"), model);
  // Nested dicts flatten with dotted keys; int keys ({0: {...}}) become their decimal text.
  expect_same(io::load_torch_checkpoint(pt("train_ckpt.pt"), "opt"), opt);
  EXPECT_FALSE(torch::equal(ema.at("0.weight"), model.at("0.weight")));
}

TEST(TorchCheckpoint, MissingOrNonDictEntryIsAnError) {
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("train_ckpt.pt"), "nope"); }, "'nope' not found"));
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("train_ckpt.pt"), "nope"); }, "'ema'"));
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("train_ckpt.pt"), "args"); }, "argparse.Namespace"));
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("state_dict.pt"), "ema"); }, "plain state_dict"));
  // A plain state_dict with "" is the dict itself.
  EXPECT_EQ(io::load_torch_checkpoint(pt("state_dict.pt"), "").size(), 13u);
}

TEST(TorchCheckpoint, ViewsShareStorageWithPyTorchStrides) {
  const auto st = io::load_safetensors(pt("views.expected.safetensors"));
  auto got = io::load_torch_checkpoint(pt("views.pt"));
  ASSERT_EQ(got.size(), st.tensors.size());
  for (const auto& [k, e] : st.tensors) {
    const auto& a = got.at(k);
    EXPECT_TRUE(torch::equal(a, e)) << k;
    std::ostringstream stride;
    for (size_t i = 0; i < size_t(a.dim()); ++i) stride << (i ? "," : "") << a.stride(int64_t(i));
    EXPECT_EQ(stride.str(), st.metadata.at("stride." + k)) << k;
    EXPECT_EQ(std::to_string(a.storage_offset()), st.metadata.at("offset." + k)) << k;
  }
  // One storage behind base/t/slice/row/expand/step: a write through one view shows in the others.
  auto base = got.at("base");
  EXPECT_TRUE(got.at("t").is_alias_of(base));
  EXPECT_TRUE(got.at("expand").is_alias_of(base));
  base.index_put_({1, 2}, 1000.0f);
  EXPECT_EQ(got.at("t")[2][1].item<float>(), 1000.0f);
  EXPECT_EQ(got.at("slice")[0][0].item<float>(), 1000.0f);
  EXPECT_EQ(got.at("step")[1][1].item<float>(), 1000.0f);
  base.index_put_({3, 4}, -7.0f);
  for (int64_t r = 0; r < 3; ++r) EXPECT_EQ(got.at("expand")[r][4].item<float>(), -7.0f);
  got.at("h").index_put_({0}, 2.0);
  EXPECT_EQ(got.at("h_all")[2].item<float>(), 2.0f);
  EXPECT_FALSE(got.at("h").is_alias_of(base));
}

TEST(TorchCheckpoint, Torch2StyleUntypedStorageAndMetadata) {
  const auto m = io::load_torch_checkpoint(pt("torch2_style.pt"));
  const auto expected = torch::tensor({12, 13, 14, 15, 16, 17}, torch::kByte).view({2, 3});
  ASSERT_EQ(m.count("u8"), 1u);
  EXPECT_EQ(m.at("u8").scalar_type(), torch::kByte);
  EXPECT_TRUE(torch::equal(m.at("u8"), expected));
}

TEST(TorchCheckpoint, HostilePicklesAreRefusedAndNeverRun) {
  std::remove(kMarker);
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("hostile_system.pt")); }, "posix.system"));
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("hostile_eval.pt")); }, "builtins.eval"));
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("hostile_unknown_call.pt")); }, "mdd_fixture_module.run"));
  EXPECT_TRUE(ThrowsWith([] { io::load_weights(pt("hostile_system.pt")); }, "refusing"));
  EXPECT_FALSE(std::filesystem::exists(kMarker));
}

TEST(TorchCheckpoint, LegacyFormatHasAClearError) {
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("legacy.pt")); }, "legacy torch.save format"));
  EXPECT_TRUE(ThrowsWith([] { io::load_weights(pt("legacy.pt")); }, "legacy torch.save format"));
}

TEST(TorchCheckpoint, MalformedTensorRecordsAreErrors) {
  const auto ok = io::load_torch_checkpoint(pt("ok_crafted.pt"));
  EXPECT_TRUE(torch::equal(ok.at("a"), torch::tensor({{1.0f, 2.0f}, {3.0f, 4.0f}})));
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("bad_extent.pt")); }, "holds only 6"));
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("bad_overflow.pt")); }, "overflow"));
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("missing_key.pt")); }, "storage key '9'"));
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("bad_numel.pt")); }, "claims 7 elements"));
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("not_storage.pt")); }, "not a storage"));
  // Errors name the opcode at the reported offset, as `pickletools.dis` prints it.
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("not_storage.pt")); }, "(REDUCE): "));
}

TEST(TorchCheckpoint, OneDefaultEntryRule) {
  auto present = [](std::initializer_list<const char*> names) {
    return [names](const std::string& e) {
      for (const char* n : names)
        if (e == n) return true;
      return false;
    };
  };
  EXPECT_EQ(io::default_weight_entry(present({"model", "ema", "opt"})), "ema");
  EXPECT_EQ(io::default_weight_entry(present({"model", "opt"})), "model");
  EXPECT_EQ(io::default_weight_entry(present({"opt"})), "");
  EXPECT_NO_THROW(io::check_weight_entry("", "here"));
  EXPECT_NO_THROW(io::check_weight_entry("ema", "here"));
  EXPECT_NO_THROW(io::check_weight_entry("model", "here"));
  EXPECT_TRUE(ThrowsWith([] { io::check_weight_entry("opt", "here"); }, "here: entry must be"));
}

TEST(TorchCheckpoint, ResourceExhaustionIsBounded) {
  // Each of these would need gigabytes or exponential time if the loader followed it naively.
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("amplify.pt")); }, "amplification"));
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("explode.pt")); }, "too many dict entries"));
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("deep.pt")); }, "nested deeper than 64"));
}

TEST(TorchCheckpoint, InputBudgetBoundsViewsAndCompressedPickles) {
  // Each fails fast with a clear error and bounded memory (measured: peak RSS growth while loading).
  const bool rss = mdd_test::reset_peak_rss();
  const double before = mdd_test::peak_rss_mib();
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("huge_view.pt")); }, "more than the 4294967296 allowed"));
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("broadcast_view.pt")); }, "more than 16x"));
  // 16 KB on disk, 16 MB of pickle: the object cap follows the bytes in the file.
  EXPECT_TRUE(ThrowsWith([] { io::load_torch_checkpoint(pt("pickle_bomb.pt")); }, "too many objects"));
  if (rss) EXPECT_LT(mdd_test::peak_rss_mib() - before, 200.0) << "peak RSS grew too much";
  // The limits are configurable: a larger view expansion admits the broadcast view.
  struct Restore {
    io::InputLimits saved = io::input_limits();
    ~Restore() { io::set_input_limits(saved); }
  } restore;
  io::InputLimits wide = restore.saved;
  wide.max_view_expansion = 1000;
  io::set_input_limits(wide);
  const auto t = io::load_torch_checkpoint(pt("broadcast_view.pt"));
  EXPECT_EQ(t.at("a").sizes().vec(), (std::vector<int64_t>{1000, 6}));
  EXPECT_TRUE(torch::equal(t.at("a")[999], torch::arange(6, torch::kFloat32)));
  wide.max_expansion = 0;
  EXPECT_THROW(io::set_input_limits(wide), Error);
}

TEST(TorchCheckpoint, PatchedArchivesAreErrors) {
  const auto dir = mdd_test::tmp_dir("pt_patched");
  const std::string good = slurp(pt("state_dict.pt"));
  ASSERT_GT(good.size(), 1000u);
  const std::string path = dir + "/x.pt";

  // Storage record renamed (local header and central directory alike): the key has no record.
  {
    std::string b = good;
    const std::string from = "state_dict/data/0", to = "state_dict/data/Z";
    int n = 0;
    for (size_t p = b.find(from); p != std::string::npos; p = b.find(from, p + 1), ++n) b.replace(p, from.size(), to);
    ASSERT_EQ(n, 2);
    spit(path, b);
    EXPECT_TRUE(ThrowsWith([&] { io::load_torch_checkpoint(path); }, "storage key '0'"));
  }
  // Central directory signature destroyed.
  {
    std::string b = good;
    const size_t p = b.find(std::string("PK\x01\x02", 4));
    ASSERT_NE(p, std::string::npos);
    b[p + 2] = 9;
    spit(path, b);
    EXPECT_TRUE(ThrowsWith([&] { io::load_torch_checkpoint(path); }, "central directory"));
  }
  // Central directory offset in the end record pointing past the file.
  {
    std::string b = good;
    const size_t p = b.rfind(std::string("PK\x05\x06", 4));
    ASSERT_NE(p, std::string::npos);
    b[p + 19] = char(0x7f);
    spit(path, b);
    EXPECT_TRUE(ThrowsWith([&] { io::load_torch_checkpoint(path); }, "outside the file"));
  }
  // Stored tensor bytes corrupted: the CRC check catches it.
  {
    std::string b = good;
    const std::string name = "state_dict/data/0";
    const size_t p = b.find(name);  // name inside the local header of storage 0
    ASSERT_NE(p, std::string::npos);
    const size_t local = p - 30;
    const size_t extra = uint8_t(b[local + 28]) | (uint8_t(b[local + 29]) << 8);
    const size_t data = local + 30 + name.size() + extra;
    b[data] ^= 0x55;
    spit(path, b);
    EXPECT_TRUE(ThrowsWith([&] { io::load_torch_checkpoint(path); }, "CRC"));
  }
  // Truncation at many lengths: always mdd::Error, never a crash or another exception type.
  for (size_t len = 0; len < good.size(); len += 37) {
    spit(path, good.substr(0, len));
    EXPECT_THROW(io::load_torch_checkpoint(path), Error) << "truncated to " << len;
  }
}

TEST(TorchCheckpoint, ByteFlipsNeverCrash) {
  // Every third byte of a small archive flipped in turn: the load either succeeds (the byte was
  // padding) or throws mdd::Error; nothing else is acceptable.
  const auto dir = mdd_test::tmp_dir("pt_flips");
  const std::string good = slurp(pt("views.pt"));
  const std::string path = dir + "/x.pt";
  int errors = 0;
  for (size_t i = 0; i < good.size(); i += 3) {
    std::string b = good;
    b[i] = char(b[i] ^ 0xA5);
    spit(path, b);
    try {
      io::load_torch_checkpoint(path);
    } catch (const Error&) {
      ++errors;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "byte " << i << ": non-mdd exception " << e.what();
    }
  }
  EXPECT_GT(errors, int(good.size() / 3 / 2));
}

TEST(LoadWeights, SniffsFormatByContent) {
  const auto expected = mdd_test::golden("pt/state_dict.expected.safetensors");
  expect_same(io::load_weights(pt("state_dict.pt")), expected);
  expect_same(io::load_weights(pt("state_dict.expected.safetensors")), expected);
  const auto dir = mdd_test::tmp_dir("pt_sniff");
  // The name does not matter: a safetensors file called .pt and a checkpoint called .safetensors.
  spit(dir + "/a.pt", slurp(pt("state_dict.expected.safetensors")));
  spit(dir + "/b.safetensors", slurp(pt("zip64.pt")));
  expect_same(io::load_weights(dir + "/a.pt"), expected);
  expect_same(io::load_weights(dir + "/b.safetensors"), expected);
  spit(dir + "/garbage.bin", "this is not a weight file at all, just text");
  EXPECT_TRUE(ThrowsWith([&] { io::load_weights(dir + "/garbage.bin"); }, "unrecognised weight file format"));
  spit(dir + "/empty.bin", "");
  EXPECT_TRUE(ThrowsWith([&] { io::load_weights(dir + "/empty.bin"); }, "unrecognised weight file format"));
  EXPECT_TRUE(ThrowsWith([&] { io::load_weights(dir + "/does_not_exist.pt"); }, "cannot open"));
}

// ------------------------------------------------------------ files written by PyTorch 2.x
// tests/data/pt2/ is made by tests/data/make_pt2_fixtures.py with the pinned torch 2.11 wheel:
// zip records byteorder, .data/version, .data/serialization_id, .storage_alignment; storages of
// every dtype incl. uint16/32/64 and float8 (widened on load as documented), views and strides.

TEST(TorchCheckpoint, Torch2EveryDtypeLoadsExactly) {
  const auto expected = mdd_test::golden("pt2/every_dtype.expected.safetensors");
  ASSERT_EQ(expected.size(), 20u);
  const auto got = io::load_torch_checkpoint(mdd_test::data_path("pt2/every_dtype.pt"));
  expect_same(got, expected);
  // The view still aliases its base tensor's storage, as PyTorch pickled it.
  EXPECT_TRUE(got.at("row_view").is_alias_of(got.at("f32")));
  EXPECT_EQ(got.at("transposed").strides(), (c10::IntArrayRef{1, 5}));
}

TEST(TorchCheckpoint, Torch2WeightsOnlyCheckpointEntries) {
  const auto expected = mdd_test::golden("pt2/weights_only_ckpt.expected.safetensors");
  const std::string path = mdd_test::data_path("pt2/weights_only_ckpt.pt");
  expect_same(io::load_torch_checkpoint(path), sub_map(expected, "ema"));
  expect_same(io::load_torch_checkpoint(path, "model"), sub_map(expected, "model"));
  expect_same(io::load_weights(path), sub_map(expected, "ema"));
}
