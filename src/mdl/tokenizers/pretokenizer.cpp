#include "mdl/tokenizers/pretokenizer.h"

#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/tokenizers/regex.h"
#include "mdl/tokenizers/unicode.h"

namespace mdl {

const char* const kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

namespace {

using json = nlohmann::json;

enum class Behavior { removed, isolated, merged_with_previous, merged_with_next, contiguous };

Behavior parse_behavior(const std::string& b) {
  if (b == "Removed") return Behavior::removed;
  if (b == "Isolated") return Behavior::isolated;
  if (b == "MergedWithPrevious") return Behavior::merged_with_previous;
  if (b == "MergedWithNext") return Behavior::merged_with_next;
  if (b == "Contiguous") return Behavior::contiguous;
  MDL_FAIL("[tokenizer] split behavior '", b,
           "' is unknown; expected Removed, Isolated, MergedWithPrevious, MergedWithNext or Contiguous");
}

// Splits `text` at the delimiter ranges `matches` as HF's SplitDelimiterBehavior says.
void split_by(const std::string& text, const std::vector<std::pair<size_t, size_t>>& matches,
              Behavior behavior, bool invert, std::vector<std::string>& out) {
  struct Span {
    size_t b, e;
    bool delim;
  };
  std::vector<Span> spans;
  size_t last = 0;
  for (auto [b, e] : matches) {
    if (b > last) spans.push_back({last, b, invert});
    spans.push_back({b, e, !invert});
    last = e;
  }
  if (last < text.size()) spans.push_back({last, text.size(), invert});
  std::vector<std::string> pieces;
  bool pending_next = false;
  bool previous_delim = false;
  for (const Span& s : spans) {
    std::string piece = text.substr(s.b, s.e - s.b);
    if (!s.delim) {
      if (pending_next) {
        pieces.back() += piece;
        pending_next = false;
      } else {
        pieces.push_back(piece);
      }
      previous_delim = false;
      continue;
    }
    switch (behavior) {
      case Behavior::removed:
        break;
      case Behavior::isolated:
        pieces.push_back(piece);
        break;
      case Behavior::merged_with_previous:
        if (!pieces.empty() && !previous_delim)
          pieces.back() += piece;
        else
          pieces.push_back(piece);
        break;
      case Behavior::merged_with_next:
        if (pending_next)
          pieces.back() += piece;
        else
          pieces.push_back(piece);
        pending_next = true;
        break;
      case Behavior::contiguous:
        if (previous_delim && !pieces.empty())
          pieces.back() += piece;
        else
          pieces.push_back(piece);
        break;
    }
    previous_delim = true;
  }
  for (auto& p : pieces)
    if (!p.empty()) out.push_back(std::move(p));
}

class Sequence : public PreTokenizer {
 public:
  std::vector<std::unique_ptr<PreTokenizer>> items;
  void pre_tokenize(std::vector<std::string>& pieces, bool first) const override {
    for (const auto& p : items) p->pre_tokenize(pieces, first);
  }
};

class Split : public PreTokenizer {
 public:
  Split(const std::string& pattern, bool literal, Behavior b, bool inv)
      : regex(pattern, literal), behavior(b), invert(inv) {}
  Regex regex;
  Behavior behavior;
  bool invert;
  void pre_tokenize(std::vector<std::string>& pieces, bool) const override {
    std::vector<std::string> out;
    for (const auto& p : pieces) split_by(p, regex.find_all(p), behavior, invert, out);
    pieces = std::move(out);
  }
};

class ByteLevel : public PreTokenizer {
 public:
  bool add_prefix_space = false, use_regex = true;
  Regex regex{kGpt2Pattern};
  void pre_tokenize(std::vector<std::string>& pieces, bool) const override {
    std::vector<std::string> split;
    for (auto p : pieces) {
      if (add_prefix_space && !p.empty() && p[0] != ' ') p = " " + p;
      if (use_regex) {
        for (auto [b, e] : regex.find_all(p)) split.push_back(p.substr(b, e - b));
      } else {
        split.push_back(p);
      }
    }
    const auto& table = unicode::bytes_to_unicode();
    pieces.clear();
    for (const auto& s : split) {
      std::string mapped;
      for (unsigned char c : s) mapped += unicode::encode(table[c]);
      pieces.push_back(std::move(mapped));
    }
  }
};

class Metaspace : public PreTokenizer {
 public:
  std::string replacement = "\xE2\x96\x81";  // U+2581
  std::string prepend_scheme = "always";
  bool split = true;
  void pre_tokenize(std::vector<std::string>& pieces, bool first) const override {
    std::vector<std::string> out;
    for (size_t i = 0; i < pieces.size(); ++i) {
      std::string s;
      for (char c : pieces[i]) s += c == ' ' ? replacement : std::string(1, c);
      const bool prepend = prepend_scheme == "always" || (prepend_scheme == "first" && first && i == 0);
      if (prepend && s.rfind(replacement, 0) != 0) s = replacement + s;
      if (!split) {
        out.push_back(s);
        continue;
      }
      std::vector<std::pair<size_t, size_t>> matches;
      for (size_t pos = s.find(replacement); pos != std::string::npos; pos = s.find(replacement, pos + 1))
        matches.emplace_back(pos, pos + replacement.size());
      split_by(s, matches, Behavior::merged_with_next, false, out);
    }
    pieces = std::move(out);
  }
};

// Splits on whitespace (dropped); with `isolate_punctuation` each punctuation character becomes a piece
// of its own (BERT's pre-tokenizer), without it this is WhitespaceSplit.
class WhitespacePunctuation : public PreTokenizer {
 public:
  explicit WhitespacePunctuation(bool isolate_punctuation) : isolate_(isolate_punctuation) {}
  void pre_tokenize(std::vector<std::string>& pieces, bool) const override {
    std::vector<std::string> out;
    for (const auto& p : pieces) {
      std::string current;
      for (char32_t cp : unicode::decode(p)) {
        const bool space = unicode::is_whitespace(cp), punct = isolate_ && unicode::is_punctuation(cp);
        if ((space || punct) && !current.empty()) out.push_back(current), current.clear();
        if (punct)
          out.push_back(unicode::encode(cp));
        else if (!space)
          current += unicode::encode(cp);
      }
      if (!current.empty()) out.push_back(current);
    }
    pieces = std::move(out);
  }

 private:
  bool isolate_;
};

// Keeps the matches of `\w+|[^\w\s]+` (HF's Whitespace pre-tokenizer).
class Whitespace : public PreTokenizer {
 public:
  Regex regex{R"([\p{L}\p{N}_\p{M}]+|[^\p{L}\p{N}_\p{M}\s]+)"};
  void pre_tokenize(std::vector<std::string>& pieces, bool) const override {
    std::vector<std::string> out;
    for (const auto& p : pieces)
      for (auto [b, e] : regex.find_all(p)) out.push_back(p.substr(b, e - b));
    pieces = std::move(out);
  }
};

class Digits : public PreTokenizer {
 public:
  bool individual = false;
  void pre_tokenize(std::vector<std::string>& pieces, bool) const override {
    std::vector<std::string> out;
    for (const auto& p : pieces) {
      std::vector<std::pair<size_t, size_t>> matches;
      auto chars = unicode::chars(p);
      size_t pos = 0;
      for (const auto& ch : chars) {
        if (unicode::is_digit(unicode::decode(ch)[0])) {
          if (!individual && !matches.empty() && matches.back().second == pos)
            matches.back().second += ch.size();
          else
            matches.emplace_back(pos, pos + ch.size());
        }
        pos += ch.size();
      }
      split_by(p, matches, Behavior::isolated, false, out);
    }
    pieces = std::move(out);
  }
};

class Punctuation : public PreTokenizer {
 public:
  Behavior behavior = Behavior::isolated;
  void pre_tokenize(std::vector<std::string>& pieces, bool) const override {
    std::vector<std::string> out;
    for (const auto& p : pieces) {
      std::vector<std::pair<size_t, size_t>> matches;
      size_t pos = 0;
      for (const auto& ch : unicode::chars(p)) {
        if (unicode::is_punctuation(unicode::decode(ch)[0])) matches.emplace_back(pos, pos + ch.size());
        pos += ch.size();
      }
      split_by(p, matches, behavior, false, out);
    }
    pieces = std::move(out);
  }
};

}  // namespace

std::unique_ptr<PreTokenizer> make_pretokenizer(const json& j) {
  if (j.is_null()) return nullptr;
  MDL_CHECK(j.is_object() && j.contains("type"),
            "[tokenizer] pre_tokenizer must be an object with a 'type', found ", j.dump());
  const std::string type = j["type"].get<std::string>();
  if (type == "Sequence") {
    auto s = std::make_unique<Sequence>();
    for (const auto& item : j.at("pretokenizers"))
      if (auto p = make_pretokenizer(item)) s->items.push_back(std::move(p));
    return s;
  }
  if (type == "Split") {
    const json& p = j.at("pattern");
    const bool literal = p.contains("String");
    MDL_CHECK(literal || p.contains("Regex"), "[tokenizer] Split.pattern must be {String} or {Regex}, found ",
              p.dump());
    return std::make_unique<Split>(literal ? p["String"].get<std::string>() : p["Regex"].get<std::string>(),
                                   literal, parse_behavior(j.value("behavior", std::string("Isolated"))),
                                   j.value("invert", false));
  }
  if (type == "ByteLevel") {
    auto b = std::make_unique<ByteLevel>();
    b->add_prefix_space = j.value("add_prefix_space", false);
    b->use_regex = j.value("use_regex", true);
    return b;
  }
  if (type == "Metaspace") {
    auto m = std::make_unique<Metaspace>();
    m->replacement = j.value("replacement", m->replacement);
    if (j.contains("prepend_scheme"))
      m->prepend_scheme = j["prepend_scheme"].get<std::string>();
    else if (j.contains("add_prefix_space"))
      m->prepend_scheme = j["add_prefix_space"].get<bool>() ? "always" : "never";
    m->split = j.value("split", true);
    return m;
  }
  if (type == "BertPreTokenizer") return std::make_unique<WhitespacePunctuation>(true);
  if (type == "Whitespace") return std::make_unique<Whitespace>();
  if (type == "WhitespaceSplit") return std::make_unique<WhitespacePunctuation>(false);
  if (type == "Digits") {
    auto d = std::make_unique<Digits>();
    d->individual = j.value("individual_digits", false);
    return d;
  }
  if (type == "Punctuation") {
    auto p = std::make_unique<Punctuation>();
    p->behavior = parse_behavior(j.value("behavior", std::string("Isolated")));
    return p;
  }
  MDL_FAIL(
      "[tokenizer] pre_tokenizer type '", type,
      "' is not supported; supported: Sequence, Split, ByteLevel, Metaspace, BertPreTokenizer, Whitespace, "
      "WhitespaceSplit, Digits, Punctuation");
}

}  // namespace mdl
