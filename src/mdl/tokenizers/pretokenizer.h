// Pre-tokenizers of tokenizer.json ("pre_tokenizer"): ByteLevel, Split, Metaspace, BertPreTokenizer,
// Whitespace, WhitespaceSplit, Digits, Punctuation and Sequence. Each refines a list of pieces.
#pragma once

#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

namespace mdl {

/// Splits (and may rewrite) pieces of normalised text.
class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  /// `first`: the pieces come from the first section of the input (before any added token), which
  /// matters to Metaspace's prepend_scheme "first".
  virtual void pre_tokenize(std::vector<std::string>& pieces, bool first) const = 0;
};

/// Builds the pre-tokenizer described by `j` (null: none, returns nullptr).
std::unique_ptr<PreTokenizer> make_pretokenizer(const nlohmann::json& j);

/// GPT-2's pre-tokenisation pattern (ByteLevel with use_regex).
extern const char* const kGpt2Pattern;

}  // namespace mdl
