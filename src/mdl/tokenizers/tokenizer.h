// A Hugging Face `tokenizer.json`: added tokens, normalizer, pre-tokenizer, model (BPE or WordPiece),
// post-processor and decoder, as the `tokenizers` library runs them. Covers byte-level BPE (GPT-2,
// Llama 3, Qwen2), SentencePiece-style BPE with metaspace and byte fallback (Llama 2, Mistral) and
// WordPiece (BERT).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace mdl {

/// A loaded tokenizer; cheap to copy (shares its immutable state), safe to use from several threads.
class Tokenizer {
 public:
  /// Parses tokenizer.json text; `source` names it in errors.
  static Tokenizer from_json(const std::string& json_text, const std::string& source = "tokenizer.json");
  /// Reads `DIR/tokenizer.json` (or a tokenizer.json path).
  static Tokenizer from_file(const std::string& path);

  /// Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. [CLS] ... [SEP], <s>).
  std::vector<int64_t> encode(const std::string& text, bool add_special_tokens = true) const;
  /// Text of `ids`; special tokens are dropped when `skip_special_tokens`; ids without a token decode to
  /// nothing.
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = true) const;
  /// How many bytes of `text` (= decode(ids)) no token appended to `ids` can change, at a character
  /// boundary, for streaming: not the text of a trailing run of byte-fallback tokens, which decodes as a
  /// whole ("<0xC3>" alone is U+FFFD, "<0x41>" is "A" but "<0x41><0xC3>" is two U+FFFD, as in HF), nor a
  /// trailing U+FFFD (a byte-level character still incomplete).
  size_t stable_length(const std::vector<int64_t>& ids, const std::string& text) const;
  /// The pieces the model part sees (after added-token splitting, normalisation and pre-tokenisation).
  std::vector<std::string> pre_tokenize(const std::string& text) const;

  /// Vocabulary size including added tokens (one more than the largest id).
  int64_t vocab_size() const;
  std::optional<int64_t> token_to_id(const std::string& token) const;
  std::string id_to_token(int64_t id) const;
  /// True for ids of added tokens marked special.
  bool is_special(int64_t id) const;
  /// The original JSON text.
  const std::string& json_text() const;

  struct Impl;  ///< opaque state (defined in tokenizer.cpp)

 private:
  std::shared_ptr<const Impl> impl_;
};

}  // namespace mdl
