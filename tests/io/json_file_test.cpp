// Files that are not what they claim: read_text refuses what is not a regular file (a FIFO would block
// forever, /dev/zero never ends) and what is over its limit; parse errors name the file, the line and the
// column, never the bytes they found.
#include "mdl/io/json_file.h"

#include <sys/stat.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/io/atomic_file.h"
#include "test_util.h"

namespace mdl {
namespace {

namespace fs = std::filesystem;

TEST(ReadText, RefusesFifosDevicesDirectoriesAndOversizedFiles) {
  test::TempDir dir;
  ASSERT_EQ(mkfifo((dir / "fifo").c_str(), 0600), 0);
  EXPECT_THROW_WITH(io::read_text(dir / "fifo"), "fifo",
                    "not a regular file (a FIFO)");  // returns, no writer needed
  fs::create_symlink("/dev/zero", dir / "zero.json");
  EXPECT_THROW_WITH(io::read_text(dir / "zero.json"), "zero.json", "a character device");
  EXPECT_THROW_WITH(io::read_text(dir.path()), "a directory");
  test::write_file(dir / "big.json", std::string(2000, ' '));
  EXPECT_THROW_WITH(io::read_text(dir / "big.json", 1000), "big.json", "2000 bytes", "limited to 1000 bytes");
  EXPECT_EQ(io::read_text(dir / "big.json", 2000).size(), 2000u);
  EXPECT_THROW_WITH(io::read_json(dir / "fifo"), "not a regular file");
}

TEST(JsonFile, ParseErrorsNameLineAndColumnButNotTheBytes) {
  const std::string secret = "{\n  \"a\": 1,\n  \"b\": SECRET-BYTES\n}";
  try {
    io::parse_json(secret, "x/config.json");
    FAIL() << "parsed invalid JSON";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("'x/config.json' is not valid JSON: line 3, column 8"), std::string::npos) << m;
    EXPECT_EQ(m.find("SECRET"), std::string::npos) << "the message quotes the file: " << m;
    EXPECT_EQ(m.find("last read"), std::string::npos) << m;
  }
  EXPECT_THROW_WITH(io::parse_json("", "empty.json"), "'empty.json' is not valid JSON: line 1, column 1");
  EXPECT_THROW_WITH(io::parse_json("[1, 2", "cut.json"), "'cut.json' is not valid JSON", "end of input");
  EXPECT_THROW_WITH(io::parse_json("{\"a\": \"\xff\"}", "bytes.json", " (its header)"),
                    "'bytes.json' (its header)");
  EXPECT_EQ(io::parse_json("{\"a\": [1, 2]}", "ok.json")["a"][1], 2);
  test::TempDir dir;
  test::write_file(dir / "m.json", "{\"format\": mdl}");
  EXPECT_THROW_WITH(io::read_json(dir / "m.json"), "m.json", "line 1, column 12");
}

}  // namespace
}  // namespace mdl
