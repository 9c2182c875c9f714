#include <gtest/gtest.h>

#include <fstream>

#include "mdd/io/safetensors.h"
#include "mdd/util/error.h"
#include "test_util.h"

using namespace mdd;

TEST(SafeTensors, RoundTripAllDtypesAndMetadata) {
  const auto dir = mdd_test::tmp_dir("st_roundtrip");
  io::TensorMap in;
  in["f32"] = torch::randn({3, 4});
  in["f64"] = torch::randn({2}, torch::kDouble);
  in["f16"] = torch::randn({5}).to(torch::kHalf);
  in["bf16"] = torch::randn({2, 2}).to(torch::kBFloat16);
  in["i8"] = torch::tensor({-3, 4}, torch::kChar);
  in["i16"] = torch::tensor({-300, 400}, torch::kShort);
  in["i32"] = torch::tensor({-70000}, torch::kInt);
  in["i64"] = torch::tensor({int64_t(1) << 40}, torch::kLong);
  in["u8"] = torch::tensor({0, 255}, torch::kByte);
  in["bool"] = torch::tensor({true, false, true});
  in["scalar"] = torch::tensor(3.5);
  in["empty"] = torch::zeros({0, 7});
  in["strided"] = torch::arange(12, torch::kFloat).view({3, 4}).t();  // non-contiguous input
  const std::string path = dir + "/a.safetensors";
  io::save_safetensors(path, in, {{"format", "pt"}, {"note", "héllo"}});
  auto out = io::load_safetensors(path);
  ASSERT_EQ(out.tensors.size(), in.size());
  EXPECT_EQ(out.metadata.at("format"), "pt");
  EXPECT_EQ(out.metadata.at("note"), "héllo");
  for (const auto& [k, v] : in) {
    const auto& o = out.tensors.at(k);
    EXPECT_EQ(o.scalar_type(), v.scalar_type()) << k;
    EXPECT_EQ(o.sizes(), v.sizes()) << k;
    EXPECT_TRUE(torch::equal(o, v)) << k;
  }
  // No temporary files are left behind by the atomic write.
  int files = 0;
  for (auto& e : std::filesystem::directory_iterator(dir)) (void)e, ++files;
  EXPECT_EQ(files, 1);
}

TEST(SafeTensors, ReadsGoldenFixture) {
  auto st = io::load_safetensors(mdd_test::data_path("dit_small.weights.safetensors"));
  ASSERT_TRUE(st.tensors.count("pos_embed"));
  EXPECT_EQ(st.tensors.at("pos_embed").sizes(), torch::IntArrayRef({1, 16, 64}));
  EXPECT_EQ(st.tensors.size(), 32u);
}

namespace {
std::string write_raw(const std::string& name, const std::string& header, const std::string& data, int64_t len_override = -1) {
  const auto path = mdd_test::tmp_dir("st_hostile") + "/" + name;
  std::ofstream f(path, std::ios::binary);
  uint64_t len = len_override >= 0 ? uint64_t(len_override) : header.size();
  f.write(reinterpret_cast<const char*>(&len), 8);
  f << header << data;
  return path;
}
void expect_error(const std::string& path, const std::string& needle) {
  try {
    io::load_safetensors(path);
    ADD_FAILURE() << "no error for " << path;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << "message must name the file: " << e.what();
  }
}
}  // namespace

TEST(SafeTensors, HostileFilesGiveErrors) {
  const std::string ok = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  expect_error(write_raw("empty_header", "", "", 0), "not valid JSON");
  {
    const auto path = mdd_test::tmp_dir("st_trunc") + "/trunc";
    std::ofstream(path, std::ios::binary) << "abc";
    expect_error(path, "not a safetensors file");
  }
  expect_error(write_raw("past_eof", ok, std::string(8, '\0'), 1 << 20), "past the end");
  expect_error(write_raw("garbage", "{not json!!", ""), "not valid JSON");
  expect_error(write_raw("notobj", "[1,2]", ""), "not a JSON object");
  expect_error(write_raw("range", R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,800]}})", std::string(8, '\0')), "out of range");
  expect_error(write_raw("mismatch", R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", std::string(8, '\0')), "needs 12 bytes");
  expect_error(write_raw("dtype", R"({"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}})", std::string(8, '\0')), "unknown dtype");
  expect_error(write_raw("negdim", R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", std::string(8, '\0')), "invalid dimension");
  expect_error(write_raw("truncdata", ok, std::string(4, '\0')), "out of range");
  expect_error(write_raw("overlap", R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                         std::string(8, '\0')), "overlaps");
  expect_error(write_raw("trailing", ok, std::string(12, '\0')), "trailing");
  expect_error(write_raw("badbool", R"({"a":{"dtype":"BOOL","shape":[1],"data_offsets":[0,1]}})", std::string(1, '\7')), "only 0/1");
  expect_error(write_raw("badmeta", R"({"__metadata__":{"k":1}})", ""), "not a string");
  expect_error(write_raw("nooffsets", R"({"a":{"dtype":"F32","shape":[2]}})", std::string(8, '\0')), "data_offsets");
  expect_error(mdd_test::tmp_dir("st_missing") + "/does_not_exist.safetensors", "cannot open");
  {
    // A dimension nested 300k levels deep (a ~600 KB file): the error message must not print it
    // recursively (that overflowed the stack) and must stay short.
    const std::string deep = std::string(300000, '[') + std::string(300000, ']');
    const auto path = write_raw("deepdim", R"({"a":{"dtype":"F32","shape":[)" + deep + R"(],"data_offsets":[0,8]}})",
                                std::string(8, '\0'));
    try {
      io::load_safetensors(path);
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("invalid dimension [[[["), std::string::npos) << e.what();
      EXPECT_LT(std::string(e.what()).size(), 600u);
    }
  }
}

TEST(SafeTensors, WidenedDtypes) {
  // U16 / F8 have no LibTorch 1.13 dtype: they are widened on load.
  std::string data;
  uint16_t u16[2] = {65535, 7};
  data.append(reinterpret_cast<const char*>(u16), 4);
  data.push_back(char(0x38));  // E4M3: 1.0
  data.push_back(char(0x3C));  // E5M2: 1.0
  data.append(2, '\0');
  auto path = write_raw("wide", R"({"u":{"dtype":"U16","shape":[2],"data_offsets":[0,4]},"e":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[4,5]},"m":{"dtype":"F8_E5M2","shape":[1],"data_offsets":[5,6]},"z":{"dtype":"U8","shape":[2],"data_offsets":[6,8]}})", data);
  auto st = io::load_safetensors(path);
  EXPECT_EQ(st.tensors.at("u")[0].item<int64_t>(), 65535);
  EXPECT_FLOAT_EQ(st.tensors.at("e")[0].item<float>(), 1.0f);
  EXPECT_FLOAT_EQ(st.tensors.at("m")[0].item<float>(), 1.0f);
}

// Written by the `safetensors` package under torch 2.11 (tests/data/make_pt2_fixtures.py): every
// dtype incl. F8_E4M3 / F8_E5M2 and U16 / U32 / U64, which load widened (float32 / int64).
TEST(SafeTensors, FileFromTheSafetensorsPackage) {
  const auto got = io::load_safetensors(mdd_test::data_path("pt2/package.safetensors"));
  const auto want = io::load_safetensors(mdd_test::data_path("pt2/package.expected.safetensors")).tensors;
  ASSERT_EQ(got.tensors.size(), want.size());
  ASSERT_EQ(want.size(), 18u);
  for (const auto& kv : want) {
    ASSERT_EQ(got.tensors.count(kv.first), 1u) << kv.first;
    const auto& a = got.tensors.at(kv.first);
    EXPECT_EQ(a.scalar_type(), kv.second.scalar_type()) << kv.first;
    EXPECT_TRUE(torch::equal(a, kv.second)) << kv.first;
  }
  EXPECT_EQ(got.metadata.at("format"), "pt");
}
