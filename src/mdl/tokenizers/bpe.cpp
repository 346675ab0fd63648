#include "mdl/tokenizers/bpe.h"

#include <cstdio>
#include <nlohmann/json.hpp>
#include <queue>

#include "mdl/core/error.h"
#include "mdl/tokenizers/unicode.h"

namespace mdl {

Bpe::Bpe(const nlohmann::json& j, int64_t reserved_ids) {
  MDL_CHECK(j.contains("vocab") && j["vocab"].is_object(),
            "[tokenizer] BPE model has no object field 'vocab'");
  std::unordered_map<std::string, int64_t> vocab;
  for (auto it = j["vocab"].begin(); it != j["vocab"].end(); ++it)
    vocab[it.key()] = it.value().get<int64_t>();
  set_vocab(std::move(vocab), reserved_ids);
  if (j.contains("unk_token") && !j["unk_token"].is_null()) {
    const std::string unk = j["unk_token"].get<std::string>();
    unk_ = token_to_id(unk);
    MDL_CHECK(unk_.has_value(), "[tokenizer] BPE unk_token '", unk, "' is not in the vocabulary");
  }
  byte_fallback_ = j.value("byte_fallback", false);
  fuse_unk_ = j.value("fuse_unk", false);
  ignore_merges_ = j.value("ignore_merges", false);
  if (j.contains("continuing_subword_prefix") && !j["continuing_subword_prefix"].is_null())
    continuing_prefix_ = j["continuing_subword_prefix"].get<std::string>();
  if (j.contains("end_of_word_suffix") && !j["end_of_word_suffix"].is_null())
    end_suffix_ = j["end_of_word_suffix"].get<std::string>();
  int rank = 0;
  for (const auto& m : j.value("merges", nlohmann::json::array())) {
    std::string a, b;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ', 1);
      MDL_CHECK(space != std::string::npos, "[tokenizer] BPE merge #", rank, " '", s,
                "' is not 'left right'");
      a = s.substr(0, space);
      b = s.substr(space + 1);
    } else {
      MDL_CHECK(m.is_array() && m.size() == 2, "[tokenizer] BPE merge #", rank,
                " must be \"a b\" or [a, b], found ", m.dump());
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    }
    auto ia = token_to_id(a), ib = token_to_id(b);
    std::string merged = a + (continuing_prefix_.empty() || b.rfind(continuing_prefix_, 0) != 0
                                  ? b
                                  : b.substr(continuing_prefix_.size()));
    auto im = token_to_id(merged);
    MDL_CHECK(ia && ib && im, "[tokenizer] BPE merge #", rank, " '", a, " ", b,
              "' uses a token missing from the vocab");
    merges_.emplace(std::make_pair(*ia, *ib), Merge{rank, *im});
    ++rank;
  }
}

void Bpe::tokenize(const std::string& piece, std::vector<int64_t>& ids) const {
  if (piece.empty()) return;
  if (ignore_merges_) {
    if (auto id = token_to_id(piece)) {
      ids.push_back(*id);
      return;
    }
  }
  // Symbols: one per character (unknown characters fall back to bytes or unk).
  struct Symbol {
    int64_t id;  // -1: unknown, kept as raw text
    std::string text;
    int prev, next;
    bool alive = true;
  };
  std::vector<Symbol> symbols;
  auto chars = unicode::chars(piece);
  for (size_t i = 0; i < chars.size(); ++i) {
    std::string c = chars[i];
    if (i > 0 && !continuing_prefix_.empty()) c = continuing_prefix_ + c;
    if (i + 1 == chars.size() && !end_suffix_.empty()) c += end_suffix_;
    auto id = token_to_id(c);
    symbols.push_back({id ? *id : -1, chars[i], static_cast<int>(i) - 1, static_cast<int>(i) + 1});
  }
  // Merge by rank with a heap over adjacent pairs; stale entries are skipped when popped.
  using Entry = std::tuple<int, int, int64_t, int64_t>;  // rank, left position, left id, right id
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  auto push = [&](int left) {
    if (left < 0) return;
    int right = symbols[left].next;
    if (right >= static_cast<int>(symbols.size())) return;
    auto it = merges_.find({symbols[left].id, symbols[right].id});
    if (it != merges_.end()) heap.emplace(it->second.rank, left, symbols[left].id, symbols[right].id);
  };
  for (int i = 0; i + 1 < static_cast<int>(symbols.size()); ++i) push(i);
  while (!heap.empty()) {
    auto [rank, left, a, b] = heap.top();
    heap.pop();
    Symbol& L = symbols[left];
    if (!L.alive || L.id != a || L.next >= static_cast<int>(symbols.size())) continue;
    Symbol& R = symbols[L.next];
    if (R.id != b) continue;
    L.id = merges_.at({a, b}).id;
    L.text += R.text;
    R.alive = false;
    L.next = R.next;
    if (L.next < static_cast<int>(symbols.size())) symbols[L.next].prev = left;
    push(L.prev);
    push(left);
  }
  bool last_unk = false;
  for (const Symbol& s : symbols) {
    if (!s.alive) continue;
    if (s.id >= 0) {
      ids.push_back(s.id);
      last_unk = false;
      continue;
    }
    if (byte_fallback_) {
      std::vector<int64_t> bytes;
      bool ok = true;
      for (unsigned char c : s.text) {
        char name[8];
        std::snprintf(name, sizeof(name), "<0x%02X>", c);
        auto id = token_to_id(name);
        if (!id) {
          ok = false;
          break;
        }
        bytes.push_back(*id);
      }
      if (ok) {
        ids.insert(ids.end(), bytes.begin(), bytes.end());
        last_unk = false;
        continue;
      }
    }
    MDL_CHECK(unk_.has_value(), "[tokenizer] '", s.text,
              "' is not in the BPE vocabulary and there is no unk_token",
              byte_fallback_ ? " (nor byte tokens <0xXX>)" : "");
    if (!(fuse_unk_ && last_unk)) ids.push_back(*unk_);
    last_unk = true;
  }
}

}  // namespace mdl
