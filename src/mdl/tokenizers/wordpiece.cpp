#include "mdl/tokenizers/wordpiece.h"

#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/tokenizers/unicode.h"

namespace mdl {

WordPiece::WordPiece(const nlohmann::json& j, int64_t reserved_ids) {
  MDL_CHECK(j.contains("vocab") && j["vocab"].is_object(),
            "[tokenizer] WordPiece model has no object field 'vocab'");
  std::unordered_map<std::string, int64_t> vocab;
  for (auto it = j["vocab"].begin(); it != j["vocab"].end(); ++it)
    vocab[it.key()] = it.value().get<int64_t>();
  set_vocab(std::move(vocab), reserved_ids);
  const std::string unk = j.value("unk_token", std::string("[UNK]"));
  auto id = token_to_id(unk);
  MDL_CHECK(id.has_value(), "[tokenizer] WordPiece unk_token '", unk, "' is not in the vocabulary");
  unk_ = *id;
  prefix_ = j.value("continuing_subword_prefix", std::string("##"));
  max_chars_ = j.value("max_input_chars_per_word", 100);
}

void WordPiece::tokenize(const std::string& piece, std::vector<int64_t>& ids) const {
  auto chars = unicode::chars(piece);
  if (chars.size() > max_chars_) {
    ids.push_back(unk_);
    return;
  }
  std::vector<int64_t> out;
  size_t start = 0;
  while (start < chars.size()) {
    size_t end = chars.size();
    std::optional<int64_t> found;
    while (end > start) {
      std::string sub;
      for (size_t i = start; i < end; ++i) sub += chars[i];
      if (start > 0) sub = prefix_ + sub;
      if ((found = token_to_id(sub))) break;
      --end;
    }
    if (!found) {
      ids.push_back(unk_);
      return;
    }
    out.push_back(*found);
    start = end;
  }
  ids.insert(ids.end(), out.begin(), out.end());
}

}  // namespace mdl
