#include "mdl/tokenizers/decoder.h"

#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/tokenizers/regex.h"
#include "mdl/tokenizers/unicode.h"

namespace mdl {
namespace {

using json = nlohmann::json;

// Decodes bytes as UTF-8, each invalid byte becoming U+FFFD (lossy, as HF does).
std::string lossy_utf8(const std::string& bytes) {
  return unicode::valid_utf8(bytes);
}

class Sequence : public Decoder {
 public:
  std::vector<std::unique_ptr<Decoder>> items;
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (const auto& d : items) d->decode_chain(tokens);
  }
};

class ByteLevel : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string bytes;
    for (const auto& t : tokens) {
      std::string mapped;
      bool ok = true;
      for (char32_t cp : unicode::decode(t)) {
        int b = unicode::unicode_to_byte(cp);
        if (b < 0) {
          ok = false;
          break;
        }
        mapped += static_cast<char>(b);
      }
      bytes += ok ? mapped : t;
    }
    tokens = {lossy_utf8(bytes)};
  }
};

class WordPiece : public Decoder {
 public:
  std::string prefix = "##";
  bool cleanup = true;
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t i = 0; i < tokens.size(); ++i) {
      std::string& t = tokens[i];
      if (i != 0) {
        if (t.rfind(prefix, 0) == 0)
          t = t.substr(prefix.size());
        else
          t = " " + t;
      }
      if (cleanup) {
        // HF's cleanup: no space before punctuation and common English contractions.
        static const std::pair<const char*, const char*> rules[] = {
            {" .", "."},   {" ?", "?"},     {" !", "!"},    {" ,", ","},
            {" ' ", "'"},  {" n't", "n't"}, {" 'm", "'m"},  {" do not", " don't"},
            {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
        for (auto [from, to] : rules) {
          std::string f(from), r(to);
          for (size_t pos = t.find(f); pos != std::string::npos; pos = t.find(f, pos + r.size()))
            t.replace(pos, f.size(), r);
        }
      }
    }
  }
};

class Metaspace : public Decoder {
 public:
  std::string replacement = "\xE2\x96\x81";
  bool prepend = true;
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t i = 0; i < tokens.size(); ++i) {
      std::string out;
      const std::string& t = tokens[i];
      for (size_t pos = 0; pos < t.size();) {
        if (t.compare(pos, replacement.size(), replacement) == 0) {
          out += ' ';
          pos += replacement.size();
        } else {
          out += t[pos++];
        }
      }
      if (i == 0 && prepend && !out.empty() && out[0] == ' ') out = out.substr(1);
      tokens[i] = out;
    }
  }
};

class Replace : public Decoder {
 public:
  Replace(const std::string& pattern, bool literal, std::string c)
      : regex(pattern, literal), content(std::move(c)) {}
  Regex regex;
  std::string content;
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (auto& t : tokens) {
      std::string out;
      size_t last = 0;
      for (auto [b, e] : regex.find_all(t)) {
        out += t.substr(last, b - last) + content;
        last = e;
      }
      t = out + t.substr(last);
    }
  }
};

class ByteFallback : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    std::string bytes;
    size_t n_bytes = 0;
    auto flush = [&] {
      if (n_bytes == 0) return;
      auto cps = unicode::decode(bytes);
      bool valid = unicode::encode(cps) == bytes;
      if (valid)
        out.push_back(bytes);
      else
        for (size_t i = 0; i < n_bytes; ++i) out.push_back("\xEF\xBF\xBD");  // U+FFFD per byte, as HF
      bytes.clear();
      n_bytes = 0;
    };
    for (const auto& t : tokens) {
      int b = byte_fallback_value(t);
      if (b >= 0) {
        bytes += static_cast<char>(b);
        ++n_bytes;
      } else {
        flush();
        out.push_back(t);
      }
    }
    flush();
    tokens = std::move(out);
  }
};

class Fuse : public Decoder {
 public:
  void decode_chain(std::vector<std::string>& tokens) const override {
    std::string all;
    for (const auto& t : tokens) all += t;
    tokens = {all};
  }
};

class Strip : public Decoder {
 public:
  std::string content = " ";
  size_t start = 0, stop = 0;
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (auto& t : tokens) {
      auto chars = unicode::chars(t);
      size_t b = 0, e = chars.size();
      while (b < start && b < e && chars[b] == content) ++b;
      size_t removed = 0;
      while (removed < stop && e > b && chars[e - 1] == content) --e, ++removed;
      std::string out;
      for (size_t i = b; i < e; ++i) out += chars[i];
      t = out;
    }
  }
};

class BpeDecoder : public Decoder {
 public:
  std::string suffix = "</w>";
  void decode_chain(std::vector<std::string>& tokens) const override {
    for (size_t i = 0; i < tokens.size(); ++i) {
      std::string& t = tokens[i];
      const bool last = i + 1 == tokens.size();
      for (size_t pos = t.find(suffix); pos != std::string::npos; pos = t.find(suffix, pos))
        t.replace(pos, suffix.size(), last ? "" : " ");
    }
  }
};

}  // namespace

int byte_fallback_value(const std::string& t) {
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return -1;
  int v = 0;
  for (int i = 3; i < 5; ++i) {
    char c = t[i];
    int d = c >= '0' && c <= '9'   ? c - '0'
            : c >= 'A' && c <= 'F' ? c - 'A' + 10
            : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                   : -1;
    if (d < 0) return -1;
    v = v * 16 + d;
  }
  return v;
}

std::unique_ptr<Decoder> make_decoder(const json& j) {
  if (j.is_null()) return nullptr;
  MDL_CHECK(j.is_object() && j.contains("type"),
            "[tokenizer] decoder must be an object with a 'type', found ", j.dump());
  const std::string type = j["type"].get<std::string>();
  if (type == "Sequence") {
    auto s = std::make_unique<Sequence>();
    for (const auto& item : j.at("decoders"))
      if (auto d = make_decoder(item)) s->items.push_back(std::move(d));
    return s;
  }
  if (type == "ByteLevel") return std::make_unique<ByteLevel>();
  if (type == "WordPiece") {
    auto w = std::make_unique<WordPiece>();
    w->prefix = j.value("prefix", std::string("##"));
    w->cleanup = j.value("cleanup", true);
    return w;
  }
  if (type == "Metaspace") {
    auto m = std::make_unique<Metaspace>();
    m->replacement = j.value("replacement", m->replacement);
    if (j.contains("prepend_scheme"))
      m->prepend = j["prepend_scheme"].get<std::string>() != "never";
    else
      m->prepend = j.value("add_prefix_space", true);
    return m;
  }
  if (type == "Replace") {
    const json& p = j.at("pattern");
    const bool literal = p.contains("String");
    return std::make_unique<Replace>(
        literal ? p["String"].get<std::string>() : p.at("Regex").get<std::string>(), literal,
        j.at("content").get<std::string>());
  }
  if (type == "ByteFallback") return std::make_unique<ByteFallback>();
  if (type == "Fuse") return std::make_unique<Fuse>();
  if (type == "Strip") {
    auto s = std::make_unique<Strip>();
    s->content = j.value("content", std::string(" "));
    s->start = j.value("start", 0);
    s->stop = j.value("stop", 0);
    return s;
  }
  if (type == "BPEDecoder") {
    auto b = std::make_unique<BpeDecoder>();
    b->suffix = j.value("suffix", std::string("</w>"));
    return b;
  }
  MDL_FAIL("[tokenizer] decoder type '", type,
           "' is not supported; supported: Sequence, ByteLevel, WordPiece, Metaspace, Replace, ByteFallback, "
           "Fuse, "
           "Strip, BPEDecoder");
}

}  // namespace mdl
