// Helpers shared by the tests: temporary directories, expecting an error message, comparing tensors
// with a tolerance, waiting on an event.
//
// Tensors: exact equality (at::equal) only where both sides run the same operations on the same values
// (a save/load round trip, a rerun, a rebuilt value); where two code paths, kernels or layouts meet, a
// tolerance (EXPECT_CLOSE), since another CPU's BLAS kernels sum in another order. That two paths give
// different results is EXPECT_CHANGED (more than rounding), never bit-inequality, which two libraries
// can happen to match; bit-inequality is a change only between runs of one path (new weights, a seed).
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <thread>

namespace mdl::test {

/// A fresh directory under the system temp dir, removed with its contents on destruction.
class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "mdl-test-XXXXXX").string();
    path_ = mkdtemp(tmpl.data());
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const {
    return (std::filesystem::path(path_) / name).string();
  }

 private:
  std::string path_;
};

inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out << bytes;
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

/// max |got - want| / max(max |want|, 1e-12), in float64: how far a result is from its reference.
inline double rel_diff(const at::Tensor& got, const at::Tensor& want) {
  const at::Tensor g = got.detach().to(at::kDouble), w = want.detach().to(at::kDouble);
  if (g.sizes() != w.sizes()) return INFINITY;
  if (w.numel() == 0) return 0.0;
  return (g - w).abs().max().item<double>() / std::max(1e-12, w.abs().max().item<double>());
}

/// Peak resident memory of this process so far, in KiB (what an allocation that was refused must not raise).
inline long peak_rss_kib() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stol(line.substr(6));
  return 0;
}

/// Whether `pid` (a child of this process) has exited; it stays waitable (not reaped).
inline bool child_exited(pid_t pid) {
  siginfo_t info{};
  return pid > 0 && waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT) == 0 &&
         info.si_pid == pid;
}

/// Waits for `done()`, checking every few milliseconds; gives up only when the child `pid` (if > 0) has
/// exited or after `limit`, which bounds a hung or failed child, never how fast a machine must be.
/// Returns done().
inline bool wait_until(const std::function<bool()>& done, pid_t pid = -1,
                       std::chrono::seconds limit = std::chrono::seconds(600)) {
  const auto end = std::chrono::steady_clock::now() + limit;
  while (!done()) {
    if (child_exited(pid) || std::chrono::steady_clock::now() > end) return done();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

}  // namespace mdl::test

/// `got` equals `want` within `tol`, relative to want's largest magnitude (rel_diff).
// (clang-format's string breaking does not settle on this macro.)
// clang-format off
#define EXPECT_CLOSE(got, want, tol) \
  EXPECT_LE(::mdl::test::rel_diff((got), (want)), (tol)) << #got " differs from " #want " by more than " #tol
// clang-format on

/// `got` differs from `want` by more than float32 rounding over a small model (1e-6 relative; two
/// kernels' results differ by about 1e-7 here): a real change.
#define EXPECT_CHANGED(got, want)                       \
  EXPECT_GT(::mdl::test::rel_diff((got), (want)), 1e-6) \
      << #got " is " #want " up to rounding: nothing changed"

/// Expects `stmt` to throw an exception whose message contains every one of the given substrings.
#define EXPECT_THROW_WITH(stmt, ...)                                     \
  do {                                                                   \
    bool thrown_ = false;                                                \
    try {                                                                \
      stmt;                                                              \
    } catch (const std::exception& e_) {                                 \
      thrown_ = true;                                                    \
      for (const char* part_ : {__VA_ARGS__})                            \
        EXPECT_NE(std::string(e_.what()).find(part_), std::string::npos) \
            << "message: " << e_.what() << "\n  lacks: " << part_;       \
    }                                                                    \
    EXPECT_TRUE(thrown_) << "expected an exception from " #stmt;         \
  } while (0)
