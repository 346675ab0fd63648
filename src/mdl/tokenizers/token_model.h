// The model part of a tokenizer: maps one pre-tokenised piece to ids (BPE, WordPiece).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "mdl/core/error.h"

namespace mdl {

/// A vocabulary plus the algorithm that segments a piece into its tokens.
class TokenModel {
 public:
  virtual ~TokenModel() = default;
  /// Appends the ids of `piece`.
  virtual void tokenize(const std::string& piece, std::vector<int64_t>& ids) const = 0;

  std::optional<int64_t> token_to_id(const std::string& token) const {
    auto it = vocab_.find(token);
    if (it == vocab_.end()) return std::nullopt;
    return it->second;
  }
  /// Token string of `id`, empty if the model has none.
  std::string id_to_token(int64_t id) const {
    return id >= 0 && id < static_cast<int64_t>(tokens_.size()) ? tokens_[id] : std::string();
  }
  /// One more than the largest id.
  int64_t size() const { return static_cast<int64_t>(tokens_.size()); }

 protected:
  /// Ids are unique and below n + `reserved` for n entries (`reserved`: ids that added tokens may hold
  /// between them), so the table is never much larger than the vocabulary; Tokenizer checks the holes.
  void set_vocab(std::unordered_map<std::string, int64_t> vocab, int64_t reserved) {
    vocab_ = std::move(vocab);
    const int64_t limit = static_cast<int64_t>(vocab_.size()) + reserved;
    int64_t n = 0;
    for (const auto& [t, id] : vocab_) {
      MDL_CHECK(id >= 0 && id < limit, "[tokenizer] model.vocab: token '", t.substr(0, 40), "' has id ", id,
                "; ids are in [0, ", limit, ") for ", vocab_.size(), " entries and ", reserved,
                " added tokens: a corrupt tokenizer.json?");
      n = std::max(n, id + 1);
    }
    tokens_.assign(static_cast<size_t>(n), std::string());
    for (const auto& [t, id] : vocab_) {
      MDL_CHECK(tokens_[static_cast<size_t>(id)].empty(), "[tokenizer] model.vocab: id ", id,
                " is taken twice ('", tokens_[static_cast<size_t>(id)].substr(0, 40), "' and '",
                t.substr(0, 40), "')");
      tokens_[static_cast<size_t>(id)] = t;
    }
  }
  std::unordered_map<std::string, int64_t> vocab_;
  std::vector<std::string> tokens_;
};

}  // namespace mdl
