#pragma once
// Shared helpers for the test binaries: golden fixture access and tolerance checks.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include <torch/torch.h>

#include "mdd/io/safetensors.h"

namespace mdd_test {

/// tests/data of the source tree and the build's scratch folder (generated mdd_test_paths.cpp).
const char* test_data_dir();
const char* test_tmp_dir();

}  // namespace mdd_test

#define MDD_TEST_DATA_DIR ::mdd_test::test_data_dir()
#define MDD_TEST_TMP_DIR ::mdd_test::test_tmp_dir()

namespace mdd_test {

/// Absolute path of a file under tests/data.
inline std::string data_path(const std::string& name) { return std::string(MDD_TEST_DATA_DIR) + "/" + name; }

/// A fresh, empty scratch directory for one test.
inline std::string tmp_dir(const std::string& name) {
  std::filesystem::path p = std::filesystem::path(MDD_TEST_TMP_DIR) / name;
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

/// Resets the kernel's peak-RSS counter of this process (VmHWM) so that peak_rss_mib() measures
/// from now on. Returns false where /proc/self/clear_refs is unavailable.
inline bool reset_peak_rss() {
  std::ofstream f("/proc/self/clear_refs");
  if (!f) return false;
  f << "5";
  return bool(f.flush());
}

/// Peak resident set size of this process in MiB (VmHWM from /proc/self/status; -1 if unknown).
inline double peak_rss_mib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return -1;
}

/// Loads a golden fixture file from tests/data.
inline mdd::io::TensorMap golden(const std::string& name) { return mdd::io::load_safetensors(data_path(name)).tensors; }

/// Max |a - b| after casting both to float64 (shapes must agree).
inline double max_abs_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return (a.detach().to(torch::kCPU, torch::kFloat64) - b.detach().to(torch::kCPU, torch::kFloat64))
      .abs().max().item<double>();
}

/// gtest assertion: same shape and max abs error within `atol` (the MANIFEST tolerance).
inline ::testing::AssertionResult AllClose(const torch::Tensor& actual, const torch::Tensor& expected, double atol) {
  if (actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure() << "shape " << actual.sizes() << " != expected " << expected.sizes();
  }
  if (actual.numel() == 0) return ::testing::AssertionSuccess();
  const double err = max_abs_diff(actual, expected);
  if (!(err <= atol)) return ::testing::AssertionFailure() << "max abs err " << err << " > atol " << atol;
  return ::testing::AssertionSuccess() << "max abs err " << err;
}

}  // namespace mdd_test
