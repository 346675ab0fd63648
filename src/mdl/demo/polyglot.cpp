// The multilingual decoder the text experiments share: fortune cookies in eight languages, a BPE tokenizer
// and a small Llama trained on them here (cached by the settings and the text), and its language adapters'
// configuration.
#include "mdl/demo/polyglot.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <random>

#include "mdl/core/hash.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/checkpoint.h"
#include "mdl/modules/module_set.h"
#include "mdl/modules/module_type.h"
#include "mdl/tokenizers/tokenizer.h"
#include "mdl/tokenizers/trainer.h"
#include "mdl/training/evaluation.h"

namespace fs = std::filesystem;

namespace mdl::demo {
namespace {

/// The plain words of `text` (lower case, no punctuation) joined by spaces: the form every text takes here.
std::string plain_text(const std::string& text) {
  std::string out;
  for (const auto& w : plain_words(text)) out += (out.empty() ? "" : " ") + w;
  return out;
}

ModelConfig lm_config(const Sizes& s, const Tokenizer& tok) {
  ModelConfig c;
  c.arch = Arch::llama;
  c.model_type = "llama";
  c.architecture = "LlamaForCausalLM";
  c.head = HeadKind::causal_lm;
  c.vocab_size = (tok.vocab_size() + 63) / 64 * 64;
  c.hidden_size = s.lm_hidden;
  c.n_layer = s.lm_layers;
  c.n_head = c.n_kv_head = s.lm_heads;
  c.head_dim = s.lm_hidden / s.lm_heads;
  c.intermediate_size = s.lm_intermediate;
  c.max_position = s.seq_len + 16;
  c.norm_eps = 1e-6;
  c.activation = "silu";
  c.tie_word_embeddings = true;
  const SpecialTokens special = special_tokens_of(TokenizerKind::metaspace_bpe);
  if (!special.bos.empty()) c.bos_token_id = tok.token_to_id(special.bos).value_or(-1);
  c.eos_token_ids.clear();
  if (auto eos = tok.token_to_id(special.eos)) c.eos_token_ids.push_back(*eos);
  if (!special.pad.empty()) c.pad_token_id = tok.token_to_id(special.pad).value_or(-1);
  return parse_model_config(model_config_to_json(c), "demo LM config");
}

std::string key_of(const Context& ctx, const std::vector<LanguageText>& langs) {
  const Sizes& s = ctx.sizes;
  std::string key = "polyglot|" + std::to_string(s.lm_hidden) + "|" + std::to_string(s.lm_layers) + "|" +
                    std::to_string(s.lm_heads) + "|" + std::to_string(s.lm_intermediate) + "|" +
                    std::to_string(s.vocab) + "|" + std::to_string(s.seq_len) + "|" +
                    std::to_string(s.lm_pretrain_steps) + "|" + std::to_string(s.lm_batch) + "|" +
                    std::to_string(ctx.options.seed) + "|" + ctx.options.device;
  uint64_t h = fnv1a(key);
  for (const auto& l : langs)
    for (const auto& t : l.lm) h = fnv1a(t, h);  // the data itself
  return hex64(h);
}

}  // namespace

std::vector<LanguageText> read_languages(const Context& ctx) {
  std::vector<LanguageText> out;
  for (const auto& [language, package] : fortune_packages()) {
    auto entries = fortunes_of(ctx, language);
    std::mt19937_64 rng(ctx.options.seed + fnv1a(language));
    std::shuffle(entries.begin(), entries.end(), rng);
    LanguageText t{language, {}, {}};
    const size_t held = entries.size() / 4;
    t.held_out.assign(entries.begin(), entries.begin() + static_cast<std::ptrdiff_t>(held));
    for (size_t i = held;
         i < entries.size() && static_cast<int64_t>(t.lm.size()) < ctx.sizes.lm_texts_per_language; ++i) {
      if (plain_words(entries[i]).size() < 3) continue;
      t.lm.push_back(plain_text(entries[i]));
    }
    out.push_back(std::move(t));
  }
  return out;
}

std::vector<int64_t> encode_text(const Tokenizer& tok, const std::string& text, int64_t max_len) {
  auto ids = tok.encode(text);
  if (static_cast<int64_t>(ids.size()) > max_len) ids.resize(static_cast<size_t>(max_len));
  return ids;
}

/// Causal-LM data: every language's texts, each example tagged with its language.
Dataset lm_dataset(const std::vector<LanguageText>& langs, const Tokenizer& tok, int64_t max_len,
                   bool held_out) {
  Dataset d;
  for (const auto& l : langs) {
    d.languages.push_back(l.language);
    const auto& texts = held_out ? l.held_out : l.lm;
    for (size_t i = 0; i < texts.size() && (!held_out || i < 200); ++i) {
      Example e;
      e.ids =
          encode_text(tok, held_out ? plain_text(texts[i]) : texts[i], max_len);  // held-out entries are raw
      if (e.ids.size() < 2) continue;
      e.targets = e.ids;
      e.language = l.language;
      e.line = static_cast<int64_t>(i + 1);
      d.examples.push_back(std::move(e));
    }
  }
  return d;
}

ModuleConfig language_adapter(uint64_t seed) {
  ModuleConfig c;
  c.type = "adapter";
  c.adapter.config = "pfeiffer";
  c.adapter.reduction_factor = 8;
  c.adapter.non_linearity = "gelu";
  c.targets = module_type("adapter").default_targets(Arch::llama, c);
  c.seed = seed;
  return c;
}

Polyglot polyglot_decoder(Context& ctx, const std::vector<LanguageText>& langs) {
  const Sizes& s = ctx.sizes;
  Polyglot p;
  p.dir = (fs::path(ctx.cache_dir) / ("polyglot-" + key_of(ctx, langs))).string();
  p.cached = !ctx.options.no_cache && cache_complete(p.dir);
  nlohmann::json& info = p.info;
  if (!p.cached) {  // tokenizer and language model, trained here on every language
    ctx.progress->add(s.lm_pretrain_steps);
    const auto start = std::chrono::steady_clock::now();
    std::vector<std::string> corpus;
    for (const auto& l : langs)
      for (size_t i = 0; i < l.lm.size() && i < 2000; ++i) corpus.push_back(l.lm[i]);
    TrainerOptions tok_options;
    tok_options.kind = TokenizerKind::metaspace_bpe;
    tok_options.vocab_size = s.vocab;
    const std::string tok_json = train_tokenizer(corpus, tok_options);
    const Tokenizer tok = Tokenizer::from_json(tok_json, "demo tokenizer");
    Model model = create_model(lm_config(s, tok));
    model->init_weights(ctx.options.seed);
    model->to(ctx.device);
    ModuleSet set(model);
    const Dataset data = lm_dataset(langs, tok, s.seq_len, false);
    auto history = train(ctx, set, {}, train_options(ctx, s.lm_pretrain_steps, 3e-3, s.lm_batch, true), data,
                         "pretraining the multilingual decoder");
    const Dataset held = lm_dataset(langs, tok, s.seq_len, true);
    info["perplexity"] = evaluate_metrics(*model, held, 32).perplexity;
    info["seconds"] = seconds_since(start);
    info["texts"] = data.examples.size();
    info["loss"] = losses(history);
    info["parameters"] = model->num_parameters();
    write_dir_atomic(p.dir, [&](const std::string& tmp) {
      save_model(*model, tmp);
      io::write_text_atomic((fs::path(tmp) / "tokenizer.json").string(), tok_json);
      io::write_text_atomic((fs::path(tmp) / "pretrain.json").string(), info.dump() + "\n");
    });
  } else {
    info = nlohmann::json::parse(io::read_text((fs::path(p.dir) / "pretrain.json").string()));
  }
  return p;
}

}  // namespace mdl::demo
