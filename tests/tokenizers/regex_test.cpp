#include "mdl/tokenizers/regex.h"

#include "mdl/tokenizers/pretokenizer.h"
#include "test_util.h"

namespace mdl {
namespace {

std::vector<std::string> pieces(const Regex& re, const std::string& text) {
  std::vector<std::string> out;
  for (auto [b, e] : re.find_all(text)) out.push_back(text.substr(b, e - b));
  return out;
}

using V = std::vector<std::string>;

TEST(Regex, Gpt2PatternWithEmulatedLookahead) {
  Regex re(kGpt2Pattern);
  EXPECT_EQ(pieces(re, "Hello world"), (V{"Hello", " world"}));
  EXPECT_EQ(pieces(re, "a  b"), (V{"a", " ", " b"}));  // \s+(?!\S) gives the last space back
  EXPECT_EQ(pieces(re, "a   b"), (V{"a", "  ", " b"}));
  EXPECT_EQ(pieces(re, "hello\n\nworld"), (V{"hello", "\n", "\n", "world"}));
  EXPECT_EQ(pieces(re, "hi   "), (V{"hi", "   "}));  // at the end the whole run stays
  EXPECT_EQ(pieces(re, "it's x 's"), (V{"it", "'s", " x", " '", "s"}));
  EXPECT_EQ(pieces(re, "year 2024!!"), (V{"year", " 2024", "!!"}));
  EXPECT_EQ(pieces(re, "naïve café"), (V{"naïve", " café"}));
  // A no-break space is \s (so the run splits as spaces do) but not the literal ' ' that ` ?\p{L}+` takes.
  EXPECT_EQ(pieces(re, "a\u00A0\u00A0b"), (V{"a", "\u00A0", "\u00A0", "b"}));
}

TEST(Regex, Llama3Pattern) {
  Regex re(
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)");
  EXPECT_EQ(pieces(re, "I'M 12345 ok\n\nyes"), (V{"I", "'M", " ", "123", "45", " ok", "\n\n", "yes"}));
  EXPECT_EQ(pieces(re, "x  y"), (V{"x", " ", " y"}));
}

TEST(Regex, RefusesWhatRe2CannotDo) {
  EXPECT_THROW_WITH(Regex("a(?=b)"), "lookaround", "column 2", "a(?=b)");
  EXPECT_THROW_WITH(Regex(R"((a)\1)"), "back-references");
  EXPECT_THROW_WITH(Regex("a(b"), "cannot compile pattern 'a(b'");
  Regex literal("a.b", /*literal=*/true);
  EXPECT_EQ(pieces(literal, "a.b axb"), (V{"a.b"}));
}

}  // namespace
}  // namespace mdl
