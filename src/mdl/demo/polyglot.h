// The multilingual decoder of the demo's text experiments (7, cross-lingual transfer; 10, modules moved to
// a smaller model), internal to src/mdl/demo: each language's fortunes, the causal-LM data made of them,
// the decoder (pretrained here once and cached) and the language adapters' configuration.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "mdl/demo/demo_context.h"
#include "mdl/modules/module_set.h"
#include "mdl/training/dataset.h"

namespace mdl {
class Tokenizer;
}

namespace mdl::demo {

/// Each language's text: entries for the language model and entries held out for the tasks.
struct LanguageText {
  std::string language;
  std::vector<std::string> lm, held_out;
};

/// Every language's fortunes, shuffled by the run's seed, a quarter held out.
std::vector<LanguageText> read_languages(const Context& ctx);
/// `text`'s token ids, at most `max_len`.
std::vector<int64_t> encode_text(const Tokenizer& tok, const std::string& text, int64_t max_len);
/// Causal-LM data: every language's texts (or the first 200 held-out ones), each tagged with its language.
Dataset lm_dataset(const std::vector<LanguageText>& langs, const Tokenizer& tok, int64_t max_len,
                   bool held_out);
/// A Pfeiffer language adapter (reduction factor 8) for the decoder.
ModuleConfig language_adapter(uint64_t seed);

/// The decoder's directory (config, weights, tokenizer.json, pretrain.json) and its pretraining figures.
struct Polyglot {
  std::string dir;
  nlohmann::json info;  ///< perplexity, seconds, texts, loss, parameters
  bool cached = false;
};
/// The decoder from the cache, or pretrained here (adding its steps to the progress bar) and cached.
Polyglot polyglot_decoder(Context& ctx, const std::vector<LanguageText>& langs);

}  // namespace mdl::demo
