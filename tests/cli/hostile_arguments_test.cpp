// Flags and expressions a careless or hostile user gives the CLI: every one is refused with an error that
// names the flag, its range and why; none crashes (a signal) or runs away with memory or threads.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "cli/cli_util.h"
#include "test_util.h"

namespace mdl {
namespace {

using test::mdl;
using test::quote;
using test::Result;
namespace fs = std::filesystem;

class HostileCli : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir();
    ASSERT_EQ(mdl("init-model --arch llama --preset tiny --seed 3 --out " + quote(*dir_ / "llama")).code, 0);
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string model() { return *dir_ / "llama"; }
  static test::TempDir* dir_;
};
test::TempDir* HostileCli::dir_ = nullptr;

// The probe's serve flags: --max-batch 100000000 started 2N+8 threads, --max-body-bytes -1 meant
// unlimited, --port 70000 bound another port.
TEST_F(HostileCli, ServeFlagsOutOfRangeAreRefusedWithTheRangeAndTheReason) {
  struct Case {
    std::string flag, value, range;
  };
  for (const Case& c : std::vector<Case>{{"--max-batch", "100000000", "[1, 1024]"},
                                         {"--max-batch", "0", "[1, 1024]"},
                                         {"--max-body-bytes", "-1", "[1024, 1073741824]"},
                                         {"--port", "70000", "[0, 65535]"},
                                         {"--port", "-1", "[0, 65535]"},
                                         {"--max-queue", "0", "[1, 1000000]"},
                                         {"--module-cache-mb", "0", "[1, 1048576]"},
                                         {"--http-threads", "100000", "[0, 1024]"},
                                         {"--max-batch", "ten", "[1, 1024]"}}) {
    const Result r = mdl("serve --model " + quote(model()) + " " + c.flag + " " + c.value);
    EXPECT_GT(r.code, 0) << c.flag << " " << c.value;
    EXPECT_NE(r.err.find(c.flag), std::string::npos) << r.err;
    EXPECT_NE(r.err.find(c.range), std::string::npos) << r.err;
    EXPECT_NE(r.err.find("got " + c.value), std::string::npos) << r.err;
  }
}

// The probe's CLI crash: 18,000 nested calls overflowed the stack.
TEST_F(HostileCli, DeepNestingAndNonFiniteScalesAreRefused) {
  std::string deep;
  for (int i = 0; i < 18000; ++i) deep += "stack(";
  deep += "a";
  for (int i = 0; i < 18000; ++i) deep += ")";
  test::write_file(*dir_ / "deep.txt", deep);
  Result r = mdl("forward --model " + quote(model()) + " --ids 1,2 --out " + quote(*dir_ / "o.safetensors") +
                 " --modules \"$(cat " + quote(*dir_ / "deep.txt") + ")\"");
  EXPECT_EQ(r.code, 1) << "a signal, not an error: " << r.err.substr(0, 300);
  EXPECT_NE(r.err.find("nest at most 32 levels"), std::string::npos) << r.err.substr(0, 300);
  for (const std::string scale : {"nan", "inf", "1e999"}) {
    r = mdl("forward --model " + quote(model()) + " --ids 1,2 --out " + quote(*dir_ / "o.safetensors") +
            " --modules a:" + scale);
    EXPECT_EQ(r.code, 1) << scale;
    EXPECT_NE(r.err.find("expected a finite number"), std::string::npos) << r.err;
  }
}

// Module names in any script, and with spaces when quoted, in --modules and compositions.
TEST_F(HostileCli, ModuleNamesInAnyScriptAndQuotedWithSpaces) {
  const std::string dir = *dir_ / "mods";
  for (const std::string name : {"modül", "my module"}) {
    const Result r =
        mdl("init-module --model " + quote(model()) + " --type adapter --out " + quote(dir + "/" + name));
    ASSERT_EQ(r.code, 0) << r.err;
  }
  for (const std::string expr :
       {"modül", "\"my module\"", "stack(modül, 'my module')", "stack(\"my module\", modül)"}) {
    const Result r =
        mdl("forward --model " + quote(model()) + " --ids 1,2 --out " + quote(*dir_ / "o.safetensors") +
            " --modules-dir " + quote(dir) + " --modules " + quote(expr));
    EXPECT_EQ(r.code, 0) << expr << ": " << r.err;
  }
  const Result r =
      mdl("forward --model " + quote(model()) + " --ids 1,2 --out " + quote(*dir_ / "o.safetensors") +
          " --modules-dir " + quote(dir) + " --modules " + quote("'my module"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("the quoted name is not closed"), std::string::npos) << r.err;
}

// The probe's in-place writes: merge-into-base --out ./inplace/ (or a link to the model) overwrote the
// base, since the check compared strings; init-model over a directory of other files.
TEST_F(HostileCli, OutputsNeverOverwriteTheirInputsOrOtherFiles) {
  const std::string dir = *dir_ / "inplace";
  ASSERT_EQ(mdl("init-model --arch llama --preset tiny --seed 4 --out " + quote(dir)).code, 0);
  ASSERT_EQ(mdl("init-module --model " + quote(dir) + " --type lora --out " + quote(*dir_ / "l")).code, 0);
  const std::string before = test::read_file(dir + "/model.safetensors");
  fs::create_directory_symlink(dir, *dir_ / "alias");
  for (const std::string& out : {dir + "/", dir + "/../inplace", *dir_ / "alias"}) {
    const Result r = mdl("merge-into-base --model " + quote(dir) + " --modules " + quote(*dir_ / "l") +
                         " --out " + quote(out));
    EXPECT_EQ(r.code, 1) << out;
    EXPECT_NE(r.err.find("is the base checkpoint"), std::string::npos) << r.err;
  }
  Result r = mdl("upcycle --model " + quote(dir) + " --experts 2 --top-k 1 --out " + quote(*dir_ / "alias"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("is the dense checkpoint"), std::string::npos) << r.err;
  EXPECT_EQ(test::read_file(dir + "/model.safetensors"), before) << "the base was written over";

  fs::create_directories(*dir_ / "home");
  test::write_file(*dir_ / "home/thesis.tex", "mine");
  r = mdl("init-model --arch gpt2 --preset tiny --out " + quote(*dir_ / "home"));
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("holds 'thesis.tex'"), std::string::npos) << r.err;
  EXPECT_EQ(test::read_file(*dir_ / "home/thesis.tex"), "mine");
  // Over another checkpoint: replaced whole (a GPT-2 over a Llama leaves no Llama file behind).
  r = mdl("init-model --arch gpt2 --preset tiny --shard-mb 0.02 --out " + quote(dir));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_FALSE(fs::exists(dir + "/model.safetensors"))
      << "the Llama's single file mixed into the sharded GPT-2";
  EXPECT_TRUE(fs::exists(dir + "/model.safetensors.index.json"));
  r = mdl("inspect " + quote(dir));
  EXPECT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("GPT2LMHeadModel"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace mdl
