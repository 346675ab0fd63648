#include "mdl/tokenizers/normalizer.h"

#include <nlohmann/json.hpp>
#include <vector>

#include "mdl/core/error.h"
#include "mdl/tokenizers/regex.h"
#include "mdl/tokenizers/unicode.h"

namespace mdl {
namespace {

using json = nlohmann::json;

class Sequence : public Normalizer {
 public:
  std::vector<std::unique_ptr<Normalizer>> items;
  std::string normalize(const std::string& text) const override {
    std::string out = text;
    for (const auto& n : items) out = n->normalize(out);
    return out;
  }
};

class Form : public Normalizer {
 public:
  explicit Form(std::string f) : form(std::move(f)) {}
  std::string form;
  std::string normalize(const std::string& text) const override { return unicode::normalize(text, form); }
};

class Lowercase : public Normalizer {
 public:
  std::string normalize(const std::string& text) const override { return unicode::lowercase(text); }
};

class StripAccents : public Normalizer {
 public:
  std::string normalize(const std::string& text) const override { return unicode::strip_accents(text); }
};

class Strip : public Normalizer {
 public:
  bool left = true, right = true;
  std::string normalize(const std::string& text) const override {
    auto cps = unicode::decode(text);
    size_t b = 0, e = cps.size();
    if (left)
      while (b < e && unicode::is_whitespace(cps[b])) ++b;
    if (right)
      while (e > b && unicode::is_whitespace(cps[e - 1])) --e;
    return unicode::encode(std::vector<char32_t>(cps.begin() + b, cps.begin() + e));
  }
};

class Prepend : public Normalizer {
 public:
  std::string prefix;
  std::string normalize(const std::string& text) const override {
    return text.empty() ? text : prefix + text;
  }
};

class Replace : public Normalizer {
 public:
  Replace(const std::string& pattern, bool literal, std::string c)
      : regex(pattern, literal), content(std::move(c)) {}
  Regex regex;
  std::string content;
  std::string normalize(const std::string& text) const override {
    std::string out;
    size_t last = 0;
    for (auto [b, e] : regex.find_all(text)) {
      out += text.substr(last, b - last) + content;
      last = e;
    }
    return out + text.substr(last);
  }
};

class BertNormalizer : public Normalizer {
 public:
  bool clean_text = true, handle_chinese_chars = true, lowercase = true;
  bool strip_accents = true;
  std::string normalize(const std::string& text) const override {
    std::string out;
    for (char32_t cp : unicode::decode(text)) {
      if (clean_text) {
        if (cp == 0 || cp == 0xFFFD || unicode::is_control(cp)) continue;
        if (unicode::is_whitespace(cp)) cp = ' ';
      }
      if (handle_chinese_chars && unicode::is_cjk(cp)) {
        out += " " + unicode::encode(cp) + " ";
      } else {
        out += unicode::encode(cp);
      }
    }
    if (strip_accents) out = unicode::strip_accents(out);
    if (lowercase) out = unicode::lowercase(out);
    return out;
  }
};

std::pair<std::string, bool> pattern_of(const json& p, const char* where) {
  MDL_CHECK(p.is_object(), "[tokenizer] ", where, ".pattern must be {\"String\": ...} or {\"Regex\": ...}");
  if (p.contains("String")) return {p["String"].get<std::string>(), true};
  if (p.contains("Regex")) return {p["Regex"].get<std::string>(), false};
  MDL_FAIL("[tokenizer] ", where, ".pattern must be {\"String\": ...} or {\"Regex\": ...}, found ", p.dump());
}

}  // namespace

std::unique_ptr<Normalizer> make_normalizer(const json& j) {
  if (j.is_null()) return nullptr;
  MDL_CHECK(j.is_object() && j.contains("type"),
            "[tokenizer] normalizer must be an object with a 'type', found ", j.dump());
  const std::string type = j["type"].get<std::string>();
  if (type == "Sequence") {
    auto s = std::make_unique<Sequence>();
    for (const auto& item : j.at("normalizers"))
      if (auto n = make_normalizer(item)) s->items.push_back(std::move(n));
    return s;
  }
  if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") return std::make_unique<Form>(type);
  if (type == "Lowercase") return std::make_unique<Lowercase>();
  if (type == "StripAccents") return std::make_unique<StripAccents>();
  if (type == "Strip") {
    auto s = std::make_unique<Strip>();
    s->left = j.value("strip_left", true);
    s->right = j.value("strip_right", true);
    return s;
  }
  if (type == "Prepend") {
    auto p = std::make_unique<Prepend>();
    p->prefix = j.at("prepend").get<std::string>();
    return p;
  }
  if (type == "Replace") {
    auto [pattern, literal] = pattern_of(j.at("pattern"), "normalizer Replace");
    return std::make_unique<Replace>(pattern, literal, j.at("content").get<std::string>());
  }
  if (type == "BertNormalizer") {
    auto b = std::make_unique<BertNormalizer>();
    b->clean_text = j.value("clean_text", true);
    b->handle_chinese_chars = j.value("handle_chinese_chars", true);
    b->lowercase = j.value("lowercase", true);
    b->strip_accents = j.contains("strip_accents") && !j["strip_accents"].is_null()
                           ? j["strip_accents"].get<bool>()
                           : b->lowercase;
    return b;
  }
  MDL_FAIL("[tokenizer] normalizer type '", type,
           "' is not supported; supported: Sequence, NFC, NFD, NFKC, NFKD, Lowercase, StripAccents, Strip, "
           "Prepend, "
           "Replace, BertNormalizer");
}

}  // namespace mdl
