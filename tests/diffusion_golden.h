#pragma once
// Helpers shared by the diffusion test files: MANIFEST-style closeness (np.allclose semantics).
#include <gtest/gtest.h>

#include <cstdlib>
#include <iostream>

#include <torch/torch.h>

#include "test_util.h"

namespace mdd_test {

/// np.allclose(actual, expected, rtol, atol): |a - e| <= atol + rtol * |e| element-wise, shapes equal.
inline ::testing::AssertionResult AllCloseRel(const torch::Tensor& actual, const torch::Tensor& expected, double rtol,
                                              double atol) {
  if (actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure() << "shape " << actual.sizes() << " != expected " << expected.sizes();
  }
  if (actual.numel() == 0) return ::testing::AssertionSuccess();
  const auto a = actual.detach().to(torch::kCPU, torch::kFloat64);
  const auto e = expected.detach().to(torch::kCPU, torch::kFloat64);
  const auto err = (a - e).abs();
  const auto excess = err - (atol + rtol * e.abs());
  const double worst = excess.max().item<double>();
  const double max_err = err.max().item<double>();
  if (!(worst <= 0.0)) {
    return ::testing::AssertionFailure() << "max abs err " << max_err << ", exceeds atol " << atol << " + rtol " << rtol
                                         << "*|e| by " << worst;
  }
  // MDD_TEST_VERBOSE=1 prints every comparison's error (for reports); tests themselves stay quiet.
  if (std::getenv("MDD_TEST_VERBOSE")) {
    const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::cerr << "  [" << (info ? info->name() : "?") << "] max abs err " << max_err << " (atol " << atol
              << ", rtol " << rtol << ", max |expected| " << e.abs().max().item<double>() << ")\n";
  }
  return ::testing::AssertionSuccess() << "max abs err " << max_err;
}

}  // namespace mdd_test
