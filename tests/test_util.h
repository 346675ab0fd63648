// Helpers shared by the tests: temporary directories and expecting an error message.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

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
  std::string operator/(const std::string& name) const { return (std::filesystem::path(path_) / name).string(); }

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

}  // namespace mdl::test

/// Expects `stmt` to throw an exception whose message contains every one of the given substrings.
#define EXPECT_THROW_WITH(stmt, ...)                                              \
  do {                                                                            \
    bool thrown_ = false;                                                         \
    try {                                                                         \
      stmt;                                                                       \
    } catch (const std::exception& e_) {                                          \
      thrown_ = true;                                                             \
      for (const char* part_ : {__VA_ARGS__})                                     \
        EXPECT_NE(std::string(e_.what()).find(part_), std::string::npos)          \
            << "message: " << e_.what() << "\n  lacks: " << part_;                \
    }                                                                             \
    EXPECT_TRUE(thrown_) << "expected an exception from " #stmt;                  \
  } while (0)
