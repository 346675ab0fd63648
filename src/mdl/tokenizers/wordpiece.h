// WordPiece (tokenizer.json model type "WordPiece", BERT): greedy longest-match-first with a "##"
// continuation prefix; a word with an unknown part, or longer than max_input_chars_per_word, is [UNK].
#pragma once

#include <nlohmann/json_fwd.hpp>

#include "mdl/tokenizers/token_model.h"

namespace mdl {

/// WordPiece model.
class WordPiece : public TokenModel {
 public:
  /// `reserved_ids`: how many ids added tokens may take among the model's (TokenModel::set_vocab).
  explicit WordPiece(const nlohmann::json& j, int64_t reserved_ids = 0);
  void tokenize(const std::string& piece, std::vector<int64_t>& ids) const override;

 private:
  int64_t unk_ = 0;
  std::string prefix_ = "##";
  size_t max_chars_ = 100;
};

}  // namespace mdl
