// The model part of a tokenizer: maps one pre-tokenised piece to ids (BPE, WordPiece).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

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
  void set_vocab(std::unordered_map<std::string, int64_t> vocab) {
    vocab_ = std::move(vocab);
    int64_t n = 0;
    for (const auto& [t, id] : vocab_) n = std::max(n, id + 1);
    tokens_.assign(static_cast<size_t>(n), std::string());
    for (const auto& [t, id] : vocab_) tokens_[static_cast<size_t>(id)] = t;
  }
  std::unordered_map<std::string, int64_t> vocab_;
  std::vector<std::string> tokens_;
};

}  // namespace mdl
