// Byte-pair encoding (tokenizer.json model type "BPE"): merges applied by rank, optional byte fallback
// (<0xXX> tokens, SentencePiece style), unknown token fusing, ignore_merges (Llama 3).
#pragma once

#include <map>
#include <nlohmann/json_fwd.hpp>

#include "mdl/tokenizers/token_model.h"

namespace mdl {

/// BPE model.
class Bpe : public TokenModel {
 public:
  /// From tokenizer.json's "model" object; merges as "a b" strings or ["a", "b"] pairs.
  /// `reserved_ids`: how many ids added tokens may take among the model's (TokenModel::set_vocab).
  explicit Bpe(const nlohmann::json& j, int64_t reserved_ids = 0);
  void tokenize(const std::string& piece, std::vector<int64_t>& ids) const override;

 private:
  struct Merge {
    int rank;
    int64_t id;
  };
  std::map<std::pair<int64_t, int64_t>, Merge> merges_;
  std::optional<int64_t> unk_;
  bool byte_fallback_ = false;
  bool fuse_unk_ = false;
  bool ignore_merges_ = false;
  std::string continuing_prefix_;
  std::string end_suffix_;
};

}  // namespace mdl
