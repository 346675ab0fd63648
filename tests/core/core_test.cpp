#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "mdl/core/cpu_allocator.h"
#include "mdl/core/device.h"
#include "mdl/core/log.h"
#include "mdl/core/threads.h"
#include "mdl/io/atomic_file.h"
#include "test_util.h"

namespace mdl {
namespace {

// A warning that every load of the same files would repeat is printed once per process, by rank 0 only.
TEST(Log, WarnOncePrintsOncePerProcessAndOnlyOnRankZero) {
  EXPECT_TRUE(log_warn_once("[test] once"));
  EXPECT_FALSE(log_warn_once("[test] once"));
  EXPECT_TRUE(log_warn_once("[test] another"));
  setenv("RANK", "1", 1);
  EXPECT_FALSE(log_warn_once("[test] from rank 1"));
  setenv("RANK", "0", 1);
  EXPECT_TRUE(log_warn_once("[test] from rank 1"));
  unsetenv("RANK");
}

TEST(Threads, TheProductNeverExceedsTheBudget) {
  ThreadConfig t = configure_threads(2);
  EXPECT_EQ(t.budget, 2);
  EXPECT_EQ(t.torch_threads, 1);
  EXPECT_EQ(at::get_num_threads(), 1);
  EXPECT_LE(t.torch_threads * std::max(1, t.blas_threads), t.budget);
  ThreadConfig all = configure_threads(0);
  EXPECT_EQ(all.budget, available_cores());
  // OpenBLAS (the selected libblas.so.3 here) names its kernels; another BLAS names none.
  EXPECT_EQ(all.blas_kernels.empty(), all.blas_threads == 0) << all.blas_kernels;
}

TEST(Device, ParsesNamesAndRefusesWhatIsMissing) {
  EXPECT_EQ(parse_device("cpu").type(), c10::kCPU);
  EXPECT_THROW_WITH(parse_device("tpu"), "unknown device 'tpu'");
  EXPECT_EQ(parse_dtype("bf16"), c10::kBFloat16);
  EXPECT_EQ(parse_dtype("f32"), c10::kFloat);
  EXPECT_THROW_WITH(parse_dtype("int3"), "unknown dtype 'int3'");
  EXPECT_EQ(dtype_name(c10::kBFloat16), "bf16");
}

TEST(CpuAllocator, ReusesLargeBlocksAndKeepsDataIntact) {
  install_cpu_allocator(int64_t(256) << 20);
  ASSERT_TRUE(cpu_allocator_installed());
  const CpuAllocatorStats before = cpu_allocator_stats();
  for (int i = 0; i < 4; ++i) {
    at::Tensor t = at::full({2048, 1024}, static_cast<float>(i));  // 8 MiB: the cached path
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.data_ptr()) % (2 << 20), 0u);
    EXPECT_EQ(t.sum().item<double>(), 2048.0 * 1024 * i);
  }
  const CpuAllocatorStats after = cpu_allocator_stats();
  EXPECT_GE(after.large_hits - before.large_hits, 3);  // the first may miss, the others reuse it
  EXPECT_LE(after.cached_bytes, after.limit_bytes);
  at::Tensor small = at::arange(10, at::kFloat);  // the small path
  EXPECT_EQ(small[9].item<float>(), 9.0f);
}

// Live and peak tensor bytes (torch's memory_allocated / max_memory_allocated) on both paths.
TEST(CpuAllocator, CountsLiveAndPeakTensorBytes) {
  install_cpu_allocator(int64_t(256) << 20);
  const int64_t start = cpu_allocator_stats().live_bytes;
  reset_cpu_peak_bytes();
  EXPECT_EQ(cpu_allocator_stats().peak_bytes, start);
  {
    at::Tensor large = at::empty({3 << 20}, at::kFloat);  // 12 MiB, rounded to 2 MiB blocks: 12 MiB
    at::Tensor small = at::empty({1000}, at::kFloat);     // 4000 bytes and malloc's rounding
    const int64_t live = cpu_allocator_stats().live_bytes - start;
    EXPECT_GE(live, (int64_t(12) << 20) + 4000);
    EXPECT_LT(live, (int64_t(12) << 20) + 4000 + 4096);
  }
  const CpuAllocatorStats after = cpu_allocator_stats();
  EXPECT_EQ(after.live_bytes, start);  // both freed (the large block into the cache, which is not live)
  EXPECT_GE(after.peak_bytes - start, (int64_t(12) << 20) + 4000);
  reset_cpu_peak_bytes();
  EXPECT_EQ(cpu_allocator_stats().peak_bytes, start);
}

TEST(AtomicFile, UncommittedWritesLeaveNothing) {
  test::TempDir dir;
  {
    io::AtomicFile f(dir / "x.txt");
    f.write("partial");
  }
  EXPECT_FALSE(std::filesystem::exists(dir / "x.txt"));
  EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
  io::write_text_atomic(dir / "x.txt", "done");
  EXPECT_EQ(io::read_text(dir / "x.txt"), "done");
  EXPECT_THROW_WITH(io::read_text(dir / "nope"), "nope");
}

// A directory of files written whole: a failure before commit leaves the old one intact and no temporary;
// a commit replaces it; a directory holding other things is refused rather than replaced.
TEST(AtomicDirectory, AFailedWriteLeavesTheOldDirectoryAndCommitReplacesIt) {
  namespace fs = std::filesystem;
  test::TempDir dir;
  const std::string target = dir / "ckpt";
  {
    io::AtomicDirectory d(target);
    io::write_text_atomic(d.path() + "/config.json", "old");
    io::write_text_atomic(d.path() + "/model.safetensors", "old weights");
    d.commit();
  }
  try {
    io::AtomicDirectory d(target + "/");
    io::write_text_atomic(d.path() + "/config.json", "new");
    throw std::runtime_error("disk full");  // half-written: never committed
  } catch (const std::runtime_error&) {
  }
  EXPECT_EQ(io::read_text(target + "/config.json"), "old");
  EXPECT_EQ(io::read_text(target + "/model.safetensors"), "old weights");
  {
    io::AtomicDirectory d(target);
    io::write_text_atomic(d.path() + "/config.json", "new");
    d.commit();
  }
  EXPECT_EQ(io::read_text(target + "/config.json"), "new");
  EXPECT_FALSE(fs::exists(target + "/model.safetensors")) << "the old directory's files do not mix in";
  size_t entries = 0;
  for (const auto& e : fs::directory_iterator(dir.path())) entries += e.path().filename() == "ckpt" ? 1 : 100;
  EXPECT_EQ(entries, 1u) << "no temporary or old directory is left beside it";
  fs::create_directories(dir / "home/photos");
  test::write_file(dir / "home/notes.doc", "mine");
  EXPECT_THROW_WITH(io::AtomicDirectory(dir / "home"), "holds '", "not a checkpoint's or a module's file");
  EXPECT_TRUE(fs::exists(dir / "home/notes.doc"));
  test::write_file(dir / "file", "x");
  EXPECT_THROW_WITH(io::AtomicDirectory(dir / "file"), "exists and is not a directory");
  EXPECT_TRUE(io::same_path(dir / "ckpt/", dir / "ckpt"));
  EXPECT_TRUE(io::same_path(dir / "home/../ckpt", dir / "ckpt"));
  fs::create_symlink(dir / "ckpt", dir / "link");
  EXPECT_TRUE(io::same_path(dir / "link", dir / "ckpt"));
  EXPECT_FALSE(io::same_path(dir / "new", dir / "ckpt"));
}

}  // namespace
}  // namespace mdl
