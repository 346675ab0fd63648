// Pre-tokenisation regexes of Hugging Face tokenizers, run through RE2. HF patterns are written for
// Oniguruma; two differences are bridged here: `\s` is widened to Unicode whitespace, and the lookahead
// branch `\s+(?!\S)` (GPT-2, Llama 3, Qwen2), which RE2 cannot express, is emulated: the whitespace run
// is matched whole, then its last character is given back when a non-space follows it.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace re2 {
class RE2;
}

namespace mdl {

/// A compiled HF-style regex.
class Regex {
 public:
  /// Compiles `pattern`; throws naming the pattern for syntax RE2 lacks (other lookarounds, backrefs).
  explicit Regex(const std::string& pattern, bool literal = false);
  ~Regex();
  Regex(Regex&&) noexcept;
  /// Byte ranges [begin, end) of the successive non-overlapping matches.
  std::vector<std::pair<size_t, size_t>> find_all(const std::string& text) const;
  const std::string& pattern() const { return pattern_; }

 private:
  std::string pattern_;
  std::unique_ptr<re2::RE2> re_;
  int lookahead_group_ = -1;  ///< 1-based capture group of the emulated `\s+(?!\S)`, -1 if none
  int groups_ = 0;
};

/// Translates an HF/Oniguruma pattern to RE2 syntax; sets *lookahead_group as Regex does.
std::string translate_regex(const std::string& pattern, int* lookahead_group);

}  // namespace mdl
