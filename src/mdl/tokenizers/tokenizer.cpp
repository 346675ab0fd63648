#include "mdl/tokenizers/tokenizer.h"

#include <filesystem>
#include <nlohmann/json.hpp>
#include <unordered_map>

#include "mdl/core/error.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/json_file.h"
#include "mdl/tokenizers/bpe.h"
#include "mdl/tokenizers/decoder.h"
#include "mdl/tokenizers/normalizer.h"
#include "mdl/tokenizers/pretokenizer.h"
#include "mdl/tokenizers/unicode.h"
#include "mdl/tokenizers/wordpiece.h"

namespace mdl {

using json = nlohmann::json;

namespace {
struct AddedToken {
  int64_t id;
  std::string content;
  bool special = false;
  bool lstrip = false, rstrip = false, normalized = false;
};
}  // namespace

struct Tokenizer::Impl {
  std::string text;
  std::vector<AddedToken> added;                    // longest content first, for matching
  std::unordered_map<int64_t, size_t> added_index;  // id -> position in `added`
  bool starts_added[256] = {};                      // first bytes of added tokens: cheap rejection
  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre_tokenizer;
  std::unique_ptr<TokenModel> model;
  std::unique_ptr<Decoder> decoder;
  std::vector<int64_t> prefix, suffix;  // post-processor for a single sequence

  const AddedToken* added_by_id(int64_t id) const {
    auto it = added_index.find(id);
    return it == added_index.end() ? nullptr : &added[it->second];
  }

  // Splits text into (segment, added token or null) around added tokens.
  std::vector<std::pair<std::string, const AddedToken*>> split_added(const std::string& text) const {
    std::vector<std::pair<std::string, const AddedToken*>> out;
    std::string current;
    size_t pos = 0;
    while (pos < text.size()) {
      const AddedToken* hit = nullptr;
      if (starts_added[static_cast<unsigned char>(text[pos])]) {
        for (const auto& a : added) {
          if (!a.content.empty() && text.compare(pos, a.content.size(), a.content) == 0) {
            hit = &a;
            break;
          }
        }
      }
      if (!hit) {
        current += text[pos++];
        continue;
      }
      if (hit->lstrip)
        while (!current.empty() && std::isspace(static_cast<unsigned char>(current.back())))
          current.pop_back();
      if (!current.empty()) out.emplace_back(current, nullptr);
      current.clear();
      out.emplace_back(hit->content, hit);
      pos += hit->content.size();
      if (hit->rstrip)
        while (pos < text.size() && std::isspace(static_cast<unsigned char>(text[pos]))) ++pos;
    }
    if (!current.empty()) out.emplace_back(current, nullptr);
    return out;
  }

  std::vector<std::string> pieces_of(const std::string& segment, bool first) const {
    std::string normalized = normalizer ? normalizer->normalize(segment) : segment;
    std::vector<std::string> pieces{normalized};
    if (pre_tokenizer) pre_tokenizer->pre_tokenize(pieces, first);
    return pieces;
  }
};

namespace {

std::vector<int64_t> special_ids(const json& entry, const json& special_tokens, const std::string& source) {
  // TemplateProcessing's special_tokens: {"[CLS]": {"id": "[CLS]", "ids": [101], "tokens": ["[CLS]"]}}
  const std::string id = entry.at("id").get<std::string>();
  MDL_CHECK(special_tokens.contains(id), "[tokenizer] '", source, "': post_processor template uses '", id,
            "' which is not in its special_tokens");
  return special_tokens[id].at("ids").get<std::vector<int64_t>>();
}

void parse_post_processor(const json& j, Tokenizer::Impl& impl, const std::string& source) {
  if (j.is_null()) return;
  const std::string type = j.at("type").get<std::string>();
  if (type == "Sequence") {
    for (const auto& p : j.at("processors")) parse_post_processor(p, impl, source);
  } else if (type == "TemplateProcessing") {
    bool seen_sequence = false;
    for (const auto& piece : j.at("single")) {
      if (piece.contains("SpecialToken")) {
        auto ids = special_ids(piece["SpecialToken"], j.at("special_tokens"), source);
        auto& target = seen_sequence ? impl.suffix : impl.prefix;
        target.insert(target.end(), ids.begin(), ids.end());
      } else if (piece.contains("Sequence")) {
        seen_sequence = true;
      }
    }
  } else if (type == "BertProcessing" || type == "RobertaProcessing") {
    // {"sep": ["[SEP]", 102], "cls": ["[CLS]", 101]}
    impl.prefix = {j.at("cls")[1].get<int64_t>()};
    impl.suffix = {j.at("sep")[1].get<int64_t>()};
  } else if (type == "ByteLevel") {
    // offsets only
  } else {
    MDL_FAIL("[tokenizer] '", source, "': post_processor type '", type,
             "' is not supported; supported: TemplateProcessing, BertProcessing, RobertaProcessing, "
             "ByteLevel, Sequence");
  }
}

}  // namespace

Tokenizer Tokenizer::from_json(const std::string& text, const std::string& source) {
  const json j = io::parse_json(text, source);
  MDL_CHECK(j.is_object() && j.contains("model") && j["model"].is_object(), "[tokenizer] '", source,
            "' has no object field 'model'; is it a Hugging Face tokenizer.json?");
  auto impl = std::make_shared<Impl>();
  impl->text = text;
  try {
    impl->normalizer = make_normalizer(j.value("normalizer", json()));
    impl->pre_tokenizer = make_pretokenizer(j.value("pre_tokenizer", json()));
    impl->decoder = make_decoder(j.value("decoder", json()));
    for (const auto& a : j.value("added_tokens", json::array())) {
      AddedToken t;
      t.id = a.at("id").get<int64_t>();
      t.content = a.at("content").get<std::string>();
      t.special = a.value("special", false);
      t.lstrip = a.value("lstrip", false);
      t.rstrip = a.value("rstrip", false);
      t.normalized = a.value("normalized", false);
      impl->added.push_back(t);
    }
    const auto reserved = static_cast<int64_t>(impl->added.size());
    const json& m = j["model"];
    std::string type = m.value("type", std::string());
    if (type.empty()) type = m.contains("merges") ? "BPE" : "WordPiece";
    if (type == "BPE")
      impl->model = std::make_unique<Bpe>(m, reserved);
    else if (type == "WordPiece")
      impl->model = std::make_unique<WordPiece>(m, reserved);
    else
      MDL_FAIL("[tokenizer] model type '", type, "' is not supported; supported: BPE, WordPiece");
    std::stable_sort(impl->added.begin(), impl->added.end(), [](const AddedToken& a, const AddedToken& b) {
      return a.content.size() > b.content.size();
    });
    for (size_t i = 0; i < impl->added.size(); ++i) {
      impl->added_index.emplace(impl->added[i].id, i);
      if (!impl->added[i].content.empty())
        impl->starts_added[static_cast<unsigned char>(impl->added[i].content[0])] = true;
    }
    // Added tokens extend the model's ids or fill its holes, sometimes after a gap of reserved ids; far
    // past that is a corrupt file, and would size every id table by it. A hole no added token fills is
    // refused.
    constexpr int64_t kMaxGap = 1024;
    const int64_t id_limit = impl->model->size() + reserved + kMaxGap;
    for (const auto& a : impl->added)
      MDL_CHECK(a.id >= 0 && a.id < id_limit, "[tokenizer] added_tokens: '", a.content.substr(0, 40),
                "' has id ", a.id, "; ids of added tokens are in [0, ", id_limit, "): the model's ",
                impl->model->size(), " ids, the ", reserved, " added ones and a gap of at most ", kMaxGap);
    for (int64_t id = 0; id < impl->model->size(); ++id)
      MDL_CHECK(!impl->model->id_to_token(id).empty() || impl->added_by_id(id),
                "[tokenizer] model.vocab has no token "
                "with id ",
                id, " and no added token takes it (ids run to ", impl->model->size() - 1,
                "): a corrupt "
                "tokenizer.json?");
    parse_post_processor(j.value("post_processor", json()), *impl, source);
  } catch (const json::exception& e) {
    MDL_FAIL("[tokenizer] '", source, "': unexpected structure: ", e.what());
  } catch (const Error& e) {
    std::string what = e.what();
    if (what.find(source) == std::string::npos) what += " (in '" + source + "')";
    throw Error(what);
  }
  Tokenizer t;
  t.impl_ = impl;
  return t;
}

Tokenizer Tokenizer::from_file(const std::string& path) {
  namespace fs = std::filesystem;
  std::string file = fs::is_directory(path) ? (fs::path(path) / "tokenizer.json").string() : path;
  MDL_CHECK(fs::exists(file), "[tokenizer] '", file, "' does not exist");
  return from_json(io::read_text(file), file);
}

std::vector<std::string> Tokenizer::pre_tokenize(const std::string& text) const {
  std::vector<std::string> out;
  bool first = true;
  for (const auto& [segment, added] : impl_->split_added(text)) {
    if (added) {
      out.push_back(segment);
    } else {
      auto pieces = impl_->pieces_of(segment, first);
      out.insert(out.end(), pieces.begin(), pieces.end());
    }
    first = false;
  }
  return out;
}

std::vector<int64_t> Tokenizer::encode(const std::string& text, bool add_special_tokens) const {
  std::vector<int64_t> ids;
  if (add_special_tokens) ids = impl_->prefix;
  bool first = true;
  for (const auto& [segment, added] : impl_->split_added(text)) {
    if (added) {
      ids.push_back(added->id);
    } else {
      for (const auto& piece : impl_->pieces_of(segment, first)) impl_->model->tokenize(piece, ids);
    }
    first = false;
  }
  if (add_special_tokens) ids.insert(ids.end(), impl_->suffix.begin(), impl_->suffix.end());
  return ids;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const {
  // Runs of model tokens go through the decoder; added tokens are inserted as they are (as HF does).
  std::string out;
  std::vector<std::string> run;
  auto flush = [&] {
    if (run.empty()) return;
    if (impl_->decoder) impl_->decoder->decode_chain(run);
    for (const auto& s : run) out += s;
    run.clear();
  };
  for (int64_t id : ids) {
    if (const AddedToken* a = impl_->added_by_id(id)) {
      if (a->special && skip_special_tokens) continue;
      flush();
      out += a->content;
      continue;
    }
    // An id with no token (a model's vocabulary is often padded beyond the tokenizer's) decodes to
    // nothing, as in HF tokenizers.
    std::string token = impl_->model->id_to_token(id);
    if (!token.empty()) run.push_back(token);
  }
  flush();
  return out;
}

size_t Tokenizer::stable_length(const std::vector<int64_t>& ids, const std::string& text) const {
  static const std::string kReplacement = "\xEF\xBF\xBD";  // U+FFFD
  // The trailing run of byte-fallback tokens, as decode() groups them: ids it drops (special tokens, ids
  // without a token) do not end a run.
  size_t start = ids.size();
  bool bytes = false;
  for (; start > 0; --start) {
    const int64_t id = ids[start - 1];
    if (const AddedToken* a = impl_->added_by_id(id)) {
      if (a->special) continue;
      break;
    }
    const std::string token = impl_->model->id_to_token(id);
    if (token.empty()) continue;
    if (byte_fallback_value(token) < 0) break;
    bytes = true;
  }
  size_t stable = text.size();
  if (bytes) {
    const std::string head =
        decode(std::vector<int64_t>(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(start)));
    stable = static_cast<size_t>(std::mismatch(head.begin(), head.end(), text.begin(), text.end()).first -
                                 head.begin());
  }
  while (stable >= kReplacement.size() &&
         text.compare(stable - kReplacement.size(), kReplacement.size(), kReplacement) == 0)
    stable -= kReplacement.size();
  return unicode::char_boundary(text, stable);
}

int64_t Tokenizer::vocab_size() const {
  int64_t n = impl_->model->size();
  for (const auto& a : impl_->added) n = std::max(n, a.id + 1);
  return n;
}

std::optional<int64_t> Tokenizer::token_to_id(const std::string& token) const {
  for (const auto& a : impl_->added)  // a handful; looked up rarely (special tokens)
    if (a.content == token) return a.id;
  return impl_->model->token_to_id(token);
}

std::string Tokenizer::id_to_token(int64_t id) const {
  if (const AddedToken* a = impl_->added_by_id(id)) return a->content;
  return impl_->model->id_to_token(id);
}

bool Tokenizer::is_special(int64_t id) const {
  const AddedToken* a = impl_->added_by_id(id);
  return a && a->special;
}

const std::string& Tokenizer::json_text() const {
  return impl_->text;
}

}  // namespace mdl
