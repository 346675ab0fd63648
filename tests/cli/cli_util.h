// Running the real `mdl` binary (path in $MDL_BIN, set by CTest) as a user would, from the CLI tests.
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "test_util.h"

namespace mdl::test {

struct Result {
  int code;
  std::string out, err;
};

inline std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

inline Result mdl(const std::string& args) {
  const char* bin = std::getenv("MDL_BIN");
  EXPECT_NE(bin, nullptr) << "MDL_BIN is not set (run through ctest)";
  static test::TempDir scratch;
  const std::string err_file = scratch / "stderr.txt";
  const std::string cmd = std::string(bin ? bin : "mdl") + " " + args + " 2>" + err_file;
  FILE* pipe = popen(cmd.c_str(), "r");
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof(buf), pipe)) > 0) out.append(buf, n);
  int status = pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out, test::read_file(err_file)};
}

}  // namespace mdl::test
