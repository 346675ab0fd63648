#include "mdl/tokenizers/trainer.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <unordered_map>

#include "mdl/core/error.h"
#include "mdl/tokenizers/pretokenizer.h"
#include "mdl/tokenizers/tokenizer.h"
#include "mdl/tokenizers/unicode.h"

namespace mdl {
namespace {

using json = nlohmann::json;
const std::string kMeta = "\xE2\x96\x81";  // U+2581

json added(int64_t id, const std::string& content) {
  return {{"id", id},        {"content", content},  {"single_word", false}, {"lstrip", false},
          {"rstrip", false}, {"normalized", false}, {"special", true}};
}

// The tokenizer.json of a layout, with an empty model (vocab and merges filled by the trainer).
json skeleton(TokenizerKind kind) {
  json j = {{"version", "1.0"}, {"truncation", nullptr}, {"padding", nullptr}};
  switch (kind) {
    case TokenizerKind::byte_level_bpe:
      j["normalizer"] = nullptr;
      j["pre_tokenizer"] = {
          {"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
      j["post_processor"] = {
          {"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", false}, {"use_regex", true}};
      j["decoder"] = {
          {"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
      j["model"] = {{"type", "BPE"},
                    {"dropout", nullptr},
                    {"unk_token", nullptr},
                    {"continuing_subword_prefix", ""},
                    {"end_of_word_suffix", ""},
                    {"fuse_unk", false},
                    {"byte_fallback", false}};
      break;
    case TokenizerKind::metaspace_bpe:
      j["normalizer"] = {{"type", "Sequence"},
                         {"normalizers",
                          {{{"type", "Prepend"}, {"prepend", kMeta}},
                           {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kMeta}}}}};
      j["pre_tokenizer"] = nullptr;
      j["post_processor"] = {
          {"type", "TemplateProcessing"},
          {"single",
           {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
            {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
          {"pair", json::array()},
          {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}};
      j["decoder"] = {{"type", "Sequence"},
                      {"decoders",
                       {{{"type", "Replace"}, {"pattern", {{"String", kMeta}}}, {"content", " "}},
                        {{"type", "ByteFallback"}},
                        {{"type", "Fuse"}},
                        {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}};
      j["model"] = {{"type", "BPE"},
                    {"dropout", nullptr},
                    {"unk_token", "<unk>"},
                    {"continuing_subword_prefix", nullptr},
                    {"end_of_word_suffix", nullptr},
                    {"fuse_unk", true},
                    {"byte_fallback", true}};
      break;
    case TokenizerKind::wordpiece:
      j["normalizer"] = {{"type", "BertNormalizer"},
                         {"clean_text", true},
                         {"handle_chinese_chars", true},
                         {"strip_accents", nullptr},
                         {"lowercase", true}};
      j["pre_tokenizer"] = {{"type", "BertPreTokenizer"}};
      j["post_processor"] = {{"type", "TemplateProcessing"},
                             {"single",
                              {{{"SpecialToken", {{"id", "[CLS]"}, {"type_id", 0}}}},
                               {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                               {{"SpecialToken", {{"id", "[SEP]"}, {"type_id", 0}}}}}},
                             {"pair", json::array()},
                             {"special_tokens",
                              {{"[CLS]", {{"id", "[CLS]"}, {"ids", {2}}, {"tokens", {"[CLS]"}}}},
                               {"[SEP]", {{"id", "[SEP]"}, {"ids", {3}}, {"tokens", {"[SEP]"}}}}}}};
      j["decoder"] = {{"type", "WordPiece"}, {"prefix", "##"}, {"cleanup", true}};
      j["model"] = {{"type", "WordPiece"},
                    {"unk_token", "[UNK]"},
                    {"continuing_subword_prefix", "##"},
                    {"max_input_chars_per_word", 100}};
      break;
  }
  return j;
}

struct PairHash {
  size_t operator()(uint64_t k) const { return std::hash<uint64_t>()(k); }
};
uint64_t key(int a, int b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

}  // namespace

SpecialTokens special_tokens_of(TokenizerKind kind) {
  switch (kind) {
    case TokenizerKind::byte_level_bpe:
      return {"<|endoftext|>", "<|endoftext|>", "", ""};
    case TokenizerKind::metaspace_bpe:
      return {"<s>", "</s>", "", "<unk>"};
    case TokenizerKind::wordpiece:
      return {"[CLS]", "[SEP]", "[PAD]", "[UNK]"};
  }
  return {};
}

std::string train_tokenizer(const std::vector<std::string>& texts, const TrainerOptions& options) {
  MDL_CHECK(options.vocab_size > 0, "[trainer] vocab_size must be > 0, got ", options.vocab_size);
  json j = skeleton(options.kind);
  const bool wordpiece = options.kind == TokenizerKind::wordpiece;

  // Specials and the base alphabet come first.
  std::vector<std::string> symbols;  // id -> token
  std::unordered_map<std::string, int> ids;
  auto add_symbol = [&](const std::string& s) {
    auto it = ids.find(s);
    if (it != ids.end()) return it->second;
    ids[s] = static_cast<int>(symbols.size());
    symbols.push_back(s);
    return static_cast<int>(symbols.size()) - 1;
  };
  std::vector<std::string> specials;
  if (options.kind == TokenizerKind::metaspace_bpe) specials = {"<unk>", "<s>", "</s>"};
  if (wordpiece) specials = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"};
  for (const auto& s : specials) add_symbol(s);
  if (options.kind == TokenizerKind::byte_level_bpe) {
    for (char32_t cp : unicode::bytes_to_unicode()) add_symbol(unicode::encode(cp));
  } else if (options.kind == TokenizerKind::metaspace_bpe) {
    char name[8];
    for (int b = 0; b < 256; ++b) std::snprintf(name, sizeof(name), "<0x%02X>", b), add_symbol(name);
  }

  // Count words as the tokenizer will see them.
  json probe = j;
  probe["model"]["vocab"] = json::object();
  if (!wordpiece) probe["model"]["merges"] = json::array();
  if (options.kind == TokenizerKind::metaspace_bpe) probe["model"]["vocab"]["<unk>"] = 0;
  if (wordpiece) probe["model"]["vocab"]["[UNK]"] = 0;
  Tokenizer pre = Tokenizer::from_json(probe.dump(), "trainer");
  std::map<std::string, int64_t> word_counts;
  for (const auto& text : texts) {
    for (const auto& piece : pre.pre_tokenize(text)) {
      if (options.kind == TokenizerKind::metaspace_bpe) {
        // Words start at each U+2581: merges never cross them.
        size_t start = 0;
        for (size_t pos = piece.find(kMeta, 1); pos != std::string::npos; pos = piece.find(kMeta, pos + 1)) {
          word_counts[piece.substr(start, pos - start)]++;
          start = pos;
        }
        word_counts[piece.substr(start)]++;
      } else {
        word_counts[piece]++;
      }
    }
  }
  std::vector<std::vector<int>> words;
  std::vector<int64_t> freq;
  // Alphabet in first-seen order of sorted words: deterministic.
  for (const auto& [word, count] : word_counts) {
    std::vector<int> seq;
    auto chars = unicode::chars(word);
    for (size_t i = 0; i < chars.size(); ++i)
      seq.push_back(add_symbol(wordpiece && i > 0 ? "##" + chars[i] : chars[i]));
    words.push_back(std::move(seq));
    freq.push_back(count);
  }

  std::unordered_map<uint64_t, int64_t, PairHash> pair_count;
  std::unordered_map<uint64_t, std::set<int>, PairHash> pair_words;
  auto count_word = [&](int w, int64_t sign) {
    const auto& seq = words[w];
    for (size_t i = 0; i + 1 < seq.size(); ++i) {
      uint64_t k = key(seq[i], seq[i + 1]);
      pair_count[k] += sign * freq[w];
      if (sign > 0) pair_words[k].insert(w);
    }
  };
  for (int w = 0; w < static_cast<int>(words.size()); ++w) count_word(w, 1);

  json merges = json::array();
  while (static_cast<int64_t>(symbols.size()) < options.vocab_size) {
    uint64_t best = 0;
    int64_t best_count = 0;
    for (const auto& [k, c] : pair_count) {
      if (c < best_count || c <= 0) continue;
      if (c == best_count) {
        // Ties: the lexicographically smaller pair, so the result is independent of hash order.
        const auto &a1 = symbols[k >> 32], &b1 = symbols[k & 0xffffffff];
        const auto &a2 = symbols[best >> 32], &b2 = symbols[best & 0xffffffff];
        if (std::tie(a1, b1) >= std::tie(a2, b2)) continue;
      }
      best = k;
      best_count = c;
    }
    if (best_count < std::max<int64_t>(1, options.min_frequency)) break;
    const int a = static_cast<int>(best >> 32), b = static_cast<int>(best & 0xffffffff);
    const std::string right = wordpiece && symbols[b].rfind("##", 0) == 0 ? symbols[b].substr(2) : symbols[b];
    const int merged = add_symbol(symbols[a] + right);
    merges.push_back(symbols[a] + " " + symbols[b]);
    const std::set<int> affected = pair_words[best];
    for (int w : affected) {
      auto& seq = words[w];
      bool has = false;
      for (size_t i = 0; i + 1 < seq.size() && !has; ++i) has = seq[i] == a && seq[i + 1] == b;
      if (!has) continue;
      count_word(w, -1);
      std::vector<int> next;
      for (size_t i = 0; i < seq.size(); ++i) {
        if (i + 1 < seq.size() && seq[i] == a && seq[i + 1] == b)
          next.push_back(merged), ++i;
        else
          next.push_back(seq[i]);
      }
      seq = std::move(next);
      count_word(w, 1);
    }
    pair_count.erase(best);
    pair_words.erase(best);
  }

  json vocab = json::object();
  for (size_t i = 0; i < symbols.size(); ++i) vocab[symbols[i]] = static_cast<int64_t>(i);
  j["model"]["vocab"] = vocab;
  if (!wordpiece) j["model"]["merges"] = merges;
  json added_tokens = json::array();
  for (const auto& s : specials) added_tokens.push_back(added(ids[s], s));
  if (options.kind == TokenizerKind::byte_level_bpe) {
    const int64_t eos = static_cast<int64_t>(symbols.size());
    added_tokens.push_back(added(eos, "<|endoftext|>"));
  }
  j["added_tokens"] = added_tokens;
  return j.dump(1) + "\n";
}

}  // namespace mdl
