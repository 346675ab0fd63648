// Trains a tokenizer on text and writes it as tokenizer.json, in the layout of one of the three
// families mdl loads: byte-level BPE (GPT-2), SentencePiece-style BPE with byte fallback (Llama 2) or
// WordPiece (BERT). No pretrained vocabulary can be downloaded here, so `init-model` and the demo train
// their own.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mdl {

/// Which tokenizer.json layout to train.
enum class TokenizerKind { byte_level_bpe, metaspace_bpe, wordpiece };

/// Trainer settings.
struct TrainerOptions {
  TokenizerKind kind = TokenizerKind::byte_level_bpe;
  int64_t vocab_size = 512;   ///< target size including specials and the base alphabet
  int64_t min_frequency = 2;  ///< pairs seen fewer times are never merged
};

/// Trains on `texts` and returns tokenizer.json text. Deterministic for the same inputs.
std::string train_tokenizer(const std::vector<std::string>& texts, const TrainerOptions& options);

/// The special tokens of a layout: (bos, eos, pad, unk) strings; empty where the layout has none.
struct SpecialTokens {
  std::string bos, eos, pad, unk;
};
SpecialTokens special_tokens_of(TokenizerKind kind);

}  // namespace mdl
