#include "mdl/tokenizers/regex.h"

#include <re2/re2.h>

#include "mdl/core/error.h"
#include "mdl/tokenizers/unicode.h"

namespace mdl {
namespace {
const char* kSpaceClassBody = R"(\t\n\v\f\r\p{Z}\x{85})";
const std::string kLookahead = R"(\s+(?!\S))";
}  // namespace

std::string translate_regex(const std::string& pattern, int* lookahead_group) {
  *lookahead_group = -1;
  std::string out;
  bool in_class = false;
  int groups = 0;
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (!in_class && pattern.compare(i, kLookahead.size(), kLookahead) == 0) {
      MDL_CHECK(*lookahead_group < 0, "[regex] pattern '", pattern, "' has more than one \\s+(?!\\S) branch");
      *lookahead_group = ++groups;
      out += std::string("([") + kSpaceClassBody + "]+)";
      i += kLookahead.size() - 1;
      continue;
    }
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char n = pattern[i + 1];
      if (n == 's') {
        out += in_class ? std::string(kSpaceClassBody) : std::string("[") + kSpaceClassBody + "]";
      } else if (n == 'S') {
        MDL_CHECK(!in_class, "[regex] \\S inside a character class is not supported (pattern '", pattern,
                  "')");
        out += std::string("[^") + kSpaceClassBody + "]";
      } else if (n >= '1' && n <= '9' && !in_class) {
        MDL_FAIL("[regex] back-references are not supported by RE2 (pattern '", pattern, "')");
      } else {
        out += c;
        out += n;
      }
      ++i;
      continue;
    }
    if (in_class) {
      if (c == ']') in_class = false;
      out += c;
      continue;
    }
    if (c == '[') {
      in_class = true;
      out += c;
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += '^', ++i;
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += "\\]", ++i;  // literal ] first in class
      continue;
    }
    if (c == '(') {
      if (i + 2 < pattern.size() && pattern[i + 1] == '?' &&
          (pattern[i + 2] == '=' || pattern[i + 2] == '!' || pattern[i + 2] == '<')) {
        MDL_CHECK(
            pattern[i + 2] == '<' && i + 3 < pattern.size() && pattern[i + 3] != '=' && pattern[i + 3] != '!',
            "[regex] lookaround at column ", i + 1, " of pattern '", pattern,
            "' is not supported by RE2 (only the \\s+(?!\\S) branch is emulated)");
        ++groups;  // named group (?<name>...)
      } else if (i + 1 >= pattern.size() || pattern[i + 1] != '?') {
        ++groups;
      }
    }
    out += c;
  }
  return out;
}

Regex::Regex(const std::string& pattern, bool literal) : pattern_(pattern) {
  std::string translated = literal ? RE2::QuoteMeta(pattern) : translate_regex(pattern, &lookahead_group_);
  RE2::Options options;
  options.set_encoding(RE2::Options::EncodingUTF8);
  options.set_log_errors(false);
  re_ = std::make_unique<re2::RE2>(translated, options);
  MDL_CHECK(re_->ok(), "[regex] cannot compile pattern '", pattern, "': ", re_->error());
  groups_ = re_->NumberOfCapturingGroups();
}

Regex::~Regex() = default;
Regex::Regex(Regex&&) noexcept = default;

std::vector<std::pair<size_t, size_t>> Regex::find_all(const std::string& text) const {
  std::vector<std::pair<size_t, size_t>> out;
  std::vector<re2::StringPiece> groups(static_cast<size_t>(groups_) + 1);
  size_t pos = 0;
  while (pos <= text.size()) {
    if (!re_->Match(text, pos, text.size(), RE2::UNANCHORED, groups.data(), static_cast<int>(groups.size())))
      break;
    size_t begin = static_cast<size_t>(groups[0].data() - text.data());
    size_t end = begin + groups[0].size();
    if (end == begin) {  // empty match: step over one character
      if (begin >= text.size()) break;
      pos = begin + 1;
      while (pos < text.size() && (static_cast<unsigned char>(text[pos]) & 0xC0) == 0x80) ++pos;
      continue;
    }
    if (lookahead_group_ > 0 && groups[lookahead_group_].data() != nullptr && end < text.size()) {
      // Emulate (?!\S): a run followed by a non-space gives its last character back.
      auto next = unicode::decode(text.substr(end, 4));
      if (!next.empty() && !unicode::is_whitespace(next[0])) {
        size_t last = end - 1;
        while (last > begin && (static_cast<unsigned char>(text[last]) & 0xC0) == 0x80) --last;
        if (last > begin) end = last;
      }
    }
    out.emplace_back(begin, end);
    pos = end;
  }
  return out;
}

}  // namespace mdl
