// mdd/util/host_allocator.h: the settings are really in force (a freed large block stays in the
// process instead of going back to the kernel), and the environment switch turns them off.
// mdd/util/threads.h: LibTorch's and OpenBLAS's thread counts follow set_num_threads.
#include <gtest/gtest.h>

#include <cstdlib>
#include <vector>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <torch/torch.h>

#include "mdd/util/error.h"
#include "mdd/util/host_allocator.h"
#include "mdd/util/threads.h"

TEST(HostAllocator, EnvironmentSwitchLeavesTheAllocatorAlone) {
  ::setenv("MDD_HOST_ALLOCATOR", "default", 1);
  const auto r = mdd::tune_host_allocator();
  ::unsetenv("MDD_HOST_ALLOCATOR");
  EXPECT_FALSE(r.applied);
  EXPECT_NE(r.detail.find("MDD_HOST_ALLOCATOR=default"), std::string::npos) << r.detail;
}

TEST(HostAllocator, FreedLargeBlocksStayInTheProcess) {
#if !defined(__GLIBC__)
  GTEST_SKIP() << "only glibc's malloc is tuned";
#else
  const auto r = mdd::tune_host_allocator();
  if (!r.applied) GTEST_SKIP() << r.detail;  // e.g. a sanitizer's allocator
  EXPECT_NE(r.detail.find("256 MiB"), std::string::npos) << r.detail;
  // 8 MiB: far above glibc's default 128 KiB mmap threshold. Tuned, it comes from the heap (no
  // new mmap'ed block) and after free() the heap keeps it (free bytes grow by at least its size).
  const auto before = mallinfo2();
  std::vector<void*> blocks;
  for (int i = 0; i < 4; ++i) {
    void* p = std::malloc(8u << 20);
    ASSERT_NE(p, nullptr);
    static_cast<volatile char*>(p)[0] = 1;
    blocks.push_back(p);
  }
  const auto held = mallinfo2();
  EXPECT_EQ(held.hblkhd, before.hblkhd) << "the blocks were mmap'ed";
  for (void* p : blocks) std::free(p);
  const auto after = mallinfo2();
  EXPECT_GE(after.fordblks, before.fordblks + (16u << 20)) << "the freed blocks went back to the kernel";
#endif
}

// set_num_threads sets LibTorch's threads and, where OpenBLAS runs the products, OpenBLAS's.
TEST(Threads, SetsTorchAndBlasThreads) {
  const int before = torch::get_num_threads();
  const auto s = mdd::set_num_threads(1);
  EXPECT_EQ(s.torch_threads, 1);
  EXPECT_EQ(torch::get_num_threads(), 1);
  if (s.blas_threads != -1) {
    EXPECT_EQ(s.blas_threads, 1);
    EXPECT_EQ(mdd::blas_num_threads(), 1);
  }
  EXPECT_THROW(mdd::set_num_threads(0), mdd::Error);
  mdd::set_num_threads(before);
  EXPECT_EQ(torch::get_num_threads(), before);
}

// A rank that works alone borrows the waiting ranks' threads and must give them back: after the
// scope both LibTorch and OpenBLAS run the counts they ran before (a leaked count would
// oversubscribe the cores for the rest of the run and change results where BLAS splits differ).
TEST(Threads, ScopedThreadsRestoreBothCounts) {
  const int before = torch::get_num_threads();
  mdd::set_num_threads(1);
  {
    mdd::ScopedNumThreads borrowed(3);
    EXPECT_EQ(torch::get_num_threads(), 3);
    if (mdd::blas_num_threads() != -1) EXPECT_EQ(mdd::blas_num_threads(), 3);
    {
      mdd::ScopedNumThreads inner(2);
      EXPECT_EQ(torch::get_num_threads(), 2);
    }
    EXPECT_EQ(torch::get_num_threads(), 3);
    if (mdd::blas_num_threads() != -1) EXPECT_EQ(mdd::blas_num_threads(), 3);
  }
  EXPECT_EQ(torch::get_num_threads(), 1);
  if (mdd::blas_num_threads() != -1) EXPECT_EQ(mdd::blas_num_threads(), 1);
  EXPECT_THROW(mdd::ScopedNumThreads(0), mdd::Error);
  EXPECT_EQ(torch::get_num_threads(), 1);
  mdd::set_num_threads(before);
}
