// Experiment 7 of the demo: MAD-X-style cross-lingual transfer on a small multilingual decoder trained
// here on fortune cookies in eight languages. Language adapters learn each language with the LM
// objective; a task adapter learns, in English only and stacked on the English adapter, whether a
// sentence's words are in their original order; at test time each language's adapter goes under the
// task adapter (zero-shot), compared with the English adapter and with no language adapter.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <random>

#include "mdl/core/error.h"
#include "mdl/core/hash.h"
#include "mdl/demo/demo_context.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/checkpoint.h"
#include "mdl/modules/module_set.h"
#include "mdl/report/plot.h"
#include "mdl/tokenizers/tokenizer.h"
#include "mdl/tokenizers/trainer.h"

namespace fs = std::filesystem;

namespace mdl::demo {
namespace {

/// The plain words of `text` (lower case, no punctuation) joined by spaces: the form every text takes here.
std::string plain_text(const std::string& text) {
  std::string out;
  for (const auto& w : plain_words(text)) out += (out.empty() ? "" : " ") + w;
  return out;
}

/// Each language's text: entries for the language model and entries held out for the task.
struct LanguageText {
  std::string language;
  std::vector<std::string> lm, held_out;
};

std::vector<LanguageText> read_languages(const Context& ctx) {
  std::vector<LanguageText> out;
  for (const auto& [language, package] : fortune_packages()) {
    auto it = ctx.options.fortune_files.find(language);
    const auto files = it != ctx.options.fortune_files.end()
                           ? it->second
                           : package_files(package, ctx.options.fortunes_root, ctx.options.dpkg_info);
    auto entries = read_fortunes(files);
    MDL_CHECK(entries.size() >= 8, "[demo] only ", entries.size(), " fortunes for language '", language, "' (package ",
              package, "); expected hundreds");
    std::mt19937_64 rng(ctx.options.seed + fnv1a(language));
    std::shuffle(entries.begin(), entries.end(), rng);
    LanguageText t{language, {}, {}};
    const size_t held = entries.size() / 4;
    t.held_out.assign(entries.begin(), entries.begin() + static_cast<std::ptrdiff_t>(held));
    for (size_t i = held; i < entries.size() && static_cast<int64_t>(t.lm.size()) < ctx.sizes.lm_texts_per_language; ++i) {
      if (plain_words(entries[i]).size() < 3) continue;
      t.lm.push_back(plain_text(entries[i]));
    }
    out.push_back(std::move(t));
  }
  return out;
}

std::vector<int64_t> encode(const Tokenizer& tok, const std::string& text, int64_t max_len) {
  auto ids = tok.encode(text);
  if (static_cast<int64_t>(ids.size()) > max_len) ids.resize(static_cast<size_t>(max_len));
  return ids;
}

/// Causal-LM data: every language's texts, each example tagged with its language.
Dataset lm_dataset(const std::vector<LanguageText>& langs, const Tokenizer& tok, int64_t max_len, bool held_out) {
  Dataset d;
  for (const auto& l : langs) {
    d.languages.push_back(l.language);
    const auto& texts = held_out ? l.held_out : l.lm;
    for (size_t i = 0; i < texts.size() && (!held_out || i < 200); ++i) {
      Example e;
      e.ids = encode(tok, held_out ? plain_text(texts[i]) : texts[i], max_len);  // held-out entries are raw
      if (e.ids.size() < 2) continue;
      e.targets = e.ids;
      e.language = l.language;
      e.line = static_cast<int64_t>(i + 1);
      d.examples.push_back(std::move(e));
    }
  }
  return d;
}

Dataset task_dataset(const std::vector<WordOrderExample>& examples, const Tokenizer& tok, int64_t max_len,
                     const std::string& language) {
  Dataset d;
  d.labels = {"original", "shuffled"};
  d.languages = {language};
  for (size_t i = 0; i < examples.size(); ++i) {
    Example e;
    e.ids = encode(tok, examples[i].text, max_len);
    e.label = examples[i].label;
    e.language = language;
    e.line = static_cast<int64_t>(i + 1);
    d.examples.push_back(std::move(e));
  }
  return d;
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

ModuleConfig language_adapter(uint64_t seed) {
  ModuleConfig c;
  c.type = "adapter";
  c.adapter.config = "pfeiffer";
  c.adapter.reduction_factor = 8;
  c.adapter.non_linearity = "gelu";
  c.targets = default_targets("adapter", Arch::llama, "pfeiffer");
  c.seed = seed;
  return c;
}

std::string key_of(const Context& ctx, const std::vector<LanguageText>& langs) {
  const Sizes& s = ctx.sizes;
  std::string key = "polyglot|" + std::to_string(s.lm_hidden) + "|" + std::to_string(s.lm_layers) + "|" +
                    std::to_string(s.lm_heads) + "|" + std::to_string(s.lm_intermediate) + "|" + std::to_string(s.vocab) +
                    "|" + std::to_string(s.seq_len) + "|" + std::to_string(s.lm_pretrain_steps) + "|" +
                    std::to_string(s.lm_batch) + "|" + std::to_string(ctx.options.seed) + "|" + ctx.options.device;
  uint64_t h = fnv1a(key);
  for (const auto& l : langs)
    for (const auto& t : l.lm) h = fnv1a(t, h);  // the data itself
  return hex64(h);
}

std::string pct(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f%%", 100 * v);
  return buf;
}

/// How to call this mdl: its absolute path when this process is the mdl binary, else "mdl".
std::string mdl_command() {
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  return !ec && self.filename() == "mdl" ? self.string() : "mdl";
}

/// Switches on exactly the language adapter `language` ("" for none) among the lang-* modules.
void use_language(ModuleSet& set, const std::vector<LanguageText>& langs, const std::string& language) {
  for (const auto& l : langs) set.set_active("lang-" + l.language, l.language == language);
}

}  // namespace

int64_t planned_language_steps(const Sizes& s) {
  return s.language_adapter_steps + s.text_task_steps;
}

void run_language(Context& ctx) {
  const Sizes& s = ctx.sizes;
  const auto langs = read_languages(ctx);
  const std::string dir = (fs::path(ctx.cache_dir) / ("polyglot-" + key_of(ctx, langs))).string();
  const bool cached = !ctx.options.no_cache && cache_complete(dir);
  LoadOptions load;
  load.device = ctx.device;
  nlohmann::json info;
  if (!cached) {  // tokenizer and language model, trained here on every language
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
    write_dir_atomic(dir, [&](const std::string& tmp) {
      save_model(*model, tmp);
      io::write_text_atomic((fs::path(tmp) / "tokenizer.json").string(), tok_json);
      io::write_text_atomic((fs::path(tmp) / "pretrain.json").string(), info.dump() + "\n");
    });
  } else {
    info = nlohmann::json::parse(io::read_text((fs::path(dir) / "pretrain.json").string()));
  }
  const Tokenizer tok = Tokenizer::from_file((fs::path(dir) / "tokenizer.json").string());
  Model lm = load_model(dir, load);
  nlohmann::json result = {{"pretrain", {{"perplexity", info["perplexity"]}, {"texts", info["texts"]},
                                         {"parameters", info["parameters"]}, {"seconds", info["seconds"]},
                                         {"cached", cached}, {"path", dir}}}};

  // Language adapters, all trained in one run: each example goes through its own language's adapter.
  ModuleSet lm_set(lm);
  TrainOptions lang_options = train_options(ctx, s.language_adapter_steps, 3e-3, s.lm_batch);
  for (size_t i = 0; i < langs.size(); ++i) {
    const std::string name = "lang-" + langs[i].language;
    lm_set.add(name, language_adapter(ctx.options.seed + 70 + i));
    lang_options.routing.by_language[langs[i].language] = {name};
  }
  std::vector<std::string> lang_names = lm_set.names();
  const Dataset lm_data = lm_dataset(langs, tok, s.seq_len, false), held = lm_dataset(langs, tok, s.seq_len, true);
  train(ctx, lm_set, lang_names, lang_options, lm_data, "language adapters (8 languages, LM objective)");
  nlohmann::json perplexity = nlohmann::json::array();
  for (const auto& l : langs) {
    Dataset one;
    one.languages = held.languages;
    for (const auto& e : held.examples)
      if (e.language == l.language) one.examples.push_back(e);
    use_language(lm_set, langs, "");
    const double base = evaluate_metrics(*lm, one, 32).perplexity;
    const double adapted = evaluate_metrics(*lm, one, 32, lang_options.routing).perplexity;
    perplexity.push_back({{"language", l.language}, {"backbone", base}, {"with_language_adapter", adapted}});
  }
  result["language_model_perplexity"] = perplexity;

  // The task model: the same backbone with a two-class head, the language adapters copied over.
  ModelConfig cls_config = lm->config();
  cls_config.head = HeadKind::sequence_classification;
  cls_config.architecture = "LlamaForSequenceClassification";
  cls_config.num_labels = 2;
  cls_config.raw_json.clear();
  {  // label names in config.json, so that /v1/classify answers "original" / "shuffled"
    nlohmann::json j = nlohmann::json::parse(model_config_to_json(cls_config));
    j["id2label"] = {{"0", "original"}, {"1", "shuffled"}};
    j["label2id"] = {{"original", 0}, {"shuffled", 1}};
    cls_config = parse_model_config(j.dump(), "demo classifier config");
  }
  Model cls = create_model(cls_config);
  {  // the backbone's weights from the language model; the new head drawn as Hugging Face initialises it
    torch::NoGradGuard no_grad;
    auto from = lm->named_parameters();
    auto gen = at::detail::createCPUGenerator(ctx.options.seed + 80);
    for (auto& p : cls->named_parameters()) {
      if (const at::Tensor* src = from.find(p.key())) p.value().copy_(*src);
      else p.value().copy_(at::empty(p.value().sizes()).normal_(0.0, cls_config.initializer_range, gen));
    }
    cls->to(ctx.device);
  }
  ModuleSet set(cls);
  for (const auto& name : lang_names) {
    set.add(name, lm_set.config(name));
    set.load_tensors(name, lm_set.tensors(name), "language adapter " + name);
  }
  ModuleConfig task = language_adapter(ctx.options.seed + 90);
  set.add("word-order", task);  // after the language adapters: stacked on their output at every layer (MAD-X)
  ModuleConfig head;
  head.type = "lora";
  head.lora.r = 2;
  head.lora.alpha = 4;
  head.targets.target_modules = {"score"};
  head.seed = ctx.options.seed + 91;
  set.add("word-order-head", head);

  std::map<std::string, Dataset> tests;
  const LanguageText& english = langs.front();
  const auto en = word_order_task(english.held_out, s.text_task_train + s.text_task_test, ctx.options.seed + 100);
  MDL_CHECK(static_cast<int64_t>(en.size()) > s.text_task_test, "[demo] only ", en.size(),
            " English word-order examples; expected more than ", s.text_task_test);
  const std::vector<WordOrderExample> en_test(en.begin(), en.begin() + s.text_task_test), en_train(en.begin() + s.text_task_test, en.end());
  tests["en"] = task_dataset(en_test, tok, s.seq_len, "en");
  for (size_t i = 1; i < langs.size(); ++i)
    tests[langs[i].language] = task_dataset(word_order_task(langs[i].held_out, s.text_task_test, ctx.options.seed + 100 + i),
                                            tok, s.seq_len, langs[i].language);
  use_language(set, langs, "en");
  const Dataset en_train_data = task_dataset(en_train, tok, s.seq_len, "en");
  auto history = train(ctx, set, {"word-order", "word-order-head"},
                       train_options(ctx, s.text_task_steps, 3e-3, s.lm_batch), en_train_data,
                       "task adapter on English (word order)");
  const double train_accuracy = accuracy(predict_logits(*cls, en_train_data, 64), labels_of(en_train_data));
  nlohmann::json rows = nlohmann::json::array();
  std::vector<double> none, with_en, madx;
  std::vector<std::string> names;
  int better = 0, compared = 0;
  for (const auto& l : langs) {
    const Dataset& d = tests.at(l.language);
    const at::Tensor truth = labels_of(d);
    use_language(set, langs, "");
    const double a = accuracy(predict_logits(*cls, d, 64), truth);
    use_language(set, langs, "en");
    const double b = accuracy(predict_logits(*cls, d, 64), truth);
    use_language(set, langs, l.language);
    const double c = accuracy(predict_logits(*cls, d, 64), truth);
    rows.push_back({{"language", l.language}, {"test_examples", d.examples.size()}, {"no_language_adapter", a},
                    {"english_adapter", b}, {"madx", c}});
    none.push_back(a), with_en.push_back(b), madx.push_back(c), names.push_back(l.language);
    if (l.language != "en") ++compared, better += c > b;
  }
  result["task"] = {{"name", "word order: original (0) vs shuffled (1), lower-cased, no punctuation"},
                    {"train_examples", en_train.size()}, {"steps", s.text_task_steps},
                    {"english_train_accuracy", train_accuracy}, {"loss", losses(history)}};
  result["languages"] = rows;
  ctx.results["crosslingual"] = result;

  // Files for `mdl serve`: the classifier checkpoint with its tokenizer, and every module.
  const std::string model_dir = (fs::path(ctx.models_dir) / "polyglot-wordorder").string();
  save_model(*cls, model_dir);
  io::write_text_atomic((fs::path(model_dir) / "tokenizer.json").string(), io::read_text((fs::path(dir) / "tokenizer.json").string()));
  for (const auto& name : set.names()) set.save(name, (fs::path(ctx.modules_dir) / "text" / name).string());
  ctx.results["serve_command"] = mdl_command() + " serve --model " + model_dir + " --modules " + (fs::path(ctx.modules_dir) / "text").string();
  ctx.results["serve_example"] = "curl -s localhost:8080/v1/classify -d '{\"model\": \"lang-de,word-order,word-order-head\", "
                                 "\"input\": [\"der hund schläft im garten\"]}'";

  PlotOptions plot;
  plot.title = "Zero-shot word-order accuracy by language (task adapter trained on English)";
  plot.y_label = "accuracy";
  write_bar_plot((fs::path(ctx.figures_dir) / "crosslingual_accuracy.svg").string(), names,
                 {"no language adapter", "English adapter", "MAD-X (own language adapter)"}, {none, with_en, madx}, plot);
  ctx.figure("crosslingual", "figures/crosslingual_accuracy.svg",
             "Accuracy per language: task adapter alone, on the English adapter, on the language's own adapter");
  plot = PlotOptions();
  plot.title = "Multilingual decoder: pretraining loss";
  plot.x_label = "step", plot.y_label = "loss";
  write_line_plot((fs::path(ctx.figures_dir) / "polyglot_pretraining_loss.svg").string(), {step_series("pretraining", info["loss"].get<std::vector<double>>())}, plot);
  ctx.figure("crosslingual", "figures/polyglot_pretraining_loss.svg", "Pretraining loss of the multilingual decoder");
  plot.title = "English task adapter: training loss";
  write_line_plot((fs::path(ctx.figures_dir) / "task_adapter_loss.svg").string(), {step_series("task adapter", losses(history))}, plot);
  ctx.figure("crosslingual", "figures/task_adapter_loss.svg", "Training loss of the English word-order adapter");
  ctx.check("the English task adapter learns the task (English test accuracy above 55%)", with_en.front() > 0.55,
            "English test " + pct(with_en.front()) + ", training " + pct(train_accuracy));
  ctx.check("the MAD-X stack beats the English adapter on most languages", compared > 0 && 2 * better > compared,
            std::to_string(better) + " of " + std::to_string(compared) + " languages");
}

}  // namespace mdl::demo
