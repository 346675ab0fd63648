// Experiment 7 of the demo: MAD-X-style cross-lingual transfer on a small multilingual decoder trained
// here on fortune cookies in eight languages. Language adapters learn each language with the LM
// objective; a task adapter learns, in English only and stacked on the English adapter, whether a
// sentence's words are in their original order; at test time each language's adapter goes under the
// task adapter (zero-shot), compared with the English adapter and with no language adapter.
#include <ATen/ATen.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <random>

#include "mdl/core/error.h"
#include "mdl/core/hash.h"
#include "mdl/demo/demo_context.h"
#include "mdl/demo/polyglot.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/checkpoint.h"
#include "mdl/modules/module_set.h"
#include "mdl/modules/module_type.h"
#include "mdl/report/plot.h"
#include "mdl/tokenizers/tokenizer.h"
#include "mdl/tokenizers/trainer.h"

namespace fs = std::filesystem;

namespace mdl::demo {
namespace {

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

/// Mean next-token negative log-likelihood of each sequence under the causal LM `model` (n), with the
/// autograd graph when grad mode is on. Right-padded: a causal model's real positions never see padding.
at::Tensor sequence_nll(ModelImpl& model, const std::vector<std::vector<int64_t>>& seqs) {
  const int64_t n = static_cast<int64_t>(seqs.size());
  int64_t T = 2;
  for (const auto& q : seqs) T = std::max<int64_t>(T, static_cast<int64_t>(q.size()));
  at::Tensor ids = at::zeros({n, T}, at::kLong), real = at::zeros({n, T}, at::kFloat);
  for (int64_t i = 0; i < n; ++i) {
    const auto len = static_cast<int64_t>(seqs[static_cast<size_t>(i)].size());
    ids[i].narrow(0, 0, len).copy_(at::tensor(seqs[static_cast<size_t>(i)], at::kLong));
    real[i].narrow(0, 0, len).fill_(1);
  }
  ModelInput in;
  in.input_ids = ids.to(model.device());
  at::Tensor logp = at::log_softmax(model.forward(in).narrow(1, 0, T - 1).to(at::kFloat), -1);  // (n, T-1, V)
  at::Tensor nll = -logp.gather(2, in.input_ids.narrow(1, 1, T - 1).unsqueeze(-1)).squeeze(-1);  // (n, T-1)
  at::Tensor m = real.narrow(1, 1, T - 1).to(nll.device());
  return (nll * m).sum(1) / m.sum(1).clamp_min(1);
}

/// sequence_nll in batches of `batch`, without gradients.
std::vector<double> mean_nll(ModelImpl& model, const std::vector<std::vector<int64_t>>& seqs, int64_t batch) {
  torch::NoGradGuard no_grad;
  std::vector<double> out;
  for (size_t s = 0; s < seqs.size(); s += static_cast<size_t>(batch)) {
    const size_t e = std::min(seqs.size(), s + static_cast<size_t>(batch));
    at::Tensor per = sequence_nll(model, {seqs.begin() + static_cast<std::ptrdiff_t>(s),
                                          seqs.begin() + static_cast<std::ptrdiff_t>(e)})
                         .cpu();
    for (int64_t i = 0; i < per.size(0); ++i) out.push_back(per[i].item<double>());
  }
  return out;
}

}  // namespace

int64_t planned_language_steps(const Sizes& s) {
  return s.language_adapter_steps + s.text_task_steps;
}

void run_language(Context& ctx) {
  const Sizes& s = ctx.sizes;
  const auto langs = read_languages(ctx);
  const Polyglot polyglot = polyglot_decoder(ctx, langs);
  const std::string& dir = polyglot.dir;
  const nlohmann::json& info = polyglot.info;
  const bool cached = polyglot.cached;
  LoadOptions load;
  load.device = ctx.device;
  const Tokenizer tok = Tokenizer::from_file((fs::path(dir) / "tokenizer.json").string());
  Model lm = load_model(dir, load);
  nlohmann::json result = {{"pretrain",
                            {{"perplexity", info["perplexity"]},
                             {"texts", info["texts"]},
                             {"parameters", info["parameters"]},
                             {"seconds", info["seconds"]},
                             {"cached", cached},
                             {"path", dir}}}};

  // Language adapters, all trained in one run: each example goes through its own language's adapter.
  auto stage_start = std::chrono::steady_clock::now();
  nlohmann::json seconds;
  ModuleSet lm_set(lm);
  TrainOptions lang_options = train_options(ctx, s.language_adapter_steps, 3e-3, s.lm_batch);
  for (size_t i = 0; i < langs.size(); ++i) {
    const std::string name = "lang-" + langs[i].language;
    lm_set.add(name, language_adapter(ctx.options.seed + 70 + i));
    lang_options.routing.by_language[langs[i].language] = {name};
  }
  std::vector<std::string> lang_names = lm_set.names();
  const Dataset lm_data = lm_dataset(langs, tok, s.seq_len, false),
                held = lm_dataset(langs, tok, s.seq_len, true);
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
  seconds["language_adapters"] = seconds_since(stage_start);
  stage_start = std::chrono::steady_clock::now();
  // The task: which of two orders of the same words is the sentence as written. The decoder scores each
  // by its mean next-token loss; the task adapter, stacked on the English adapter (MAD-X), learns on
  // English pairs to give the original the lower loss. Zero-shot, each language's pairs are scored with
  // the task adapter on that language's adapter, on the English adapter, and on none.
  using EncodedPairs =
      std::pair<std::vector<std::vector<int64_t>>, std::vector<std::vector<int64_t>>>;  // originals, shuffled
  auto encode_pairs = [&](const std::vector<WordOrderPair>& pairs) {
    EncodedPairs out;
    for (const auto& p : pairs)
      out.first.push_back(encode_text(tok, p.original, s.seq_len)),
          out.second.push_back(encode_text(tok, p.shuffled, s.seq_len));
    return out;
  };
  const LanguageText& english = langs.front();
  const auto en =
      word_order_pairs(english.held_out, s.text_task_train + s.text_task_test, ctx.options.seed + 100);
  MDL_CHECK(static_cast<int64_t>(en.size()) > s.text_task_test, "[demo] only ", en.size(),
            " English word-order pairs; expected more than ", s.text_task_test);
  std::map<std::string, std::vector<WordOrderPair>> tests;
  tests["en"].assign(en.begin(), en.begin() + s.text_task_test);
  const std::vector<WordOrderPair> en_train(en.begin() + s.text_task_test, en.end());
  for (size_t i = 1; i < langs.size(); ++i)
    tests[langs[i].language] =
        word_order_pairs(langs[i].held_out, s.text_task_test, ctx.options.seed + 100 + i);

  lm_set.add("word-order",
             language_adapter(ctx.options.seed + 90));  // after the language adapters: stacked on them
  lm_set.freeze_base({"word-order"});
  use_language(lm_set, langs, "en");
  const auto train_ids = encode_pairs(en_train);
  std::vector<double> history;
  {
    ctx.progress->stage("task adapter on English (word order)", s.text_task_steps);
    torch::optim::AdamW opt(lm_set.parameters({"word-order"}),
                            torch::optim::AdamWOptions(1e-3).weight_decay(0.0));
    std::mt19937_64 rng(ctx.options.seed + 95);
    std::uniform_int_distribution<size_t> pick(0, en_train.size() - 1);
    lm->train();
    for (int64_t step = 0; step < s.text_task_steps; ++step) {
      std::vector<std::vector<int64_t>> batch;  // originals, then their shuffled twins
      std::vector<size_t> rows;
      for (int64_t b = 0; b < s.lm_batch; ++b) rows.push_back(pick(rng));
      for (size_t r : rows) batch.push_back(train_ids.first[r]);
      for (size_t r : rows) batch.push_back(train_ids.second[r]);
      at::Tensor nll = sequence_nll(*lm, batch);  // (2n)
      // -log sigmoid(loss(shuffled) - loss(original)): the original should cost less.
      at::Tensor loss =
          at::softplus(nll.narrow(0, 0, s.lm_batch) - nll.narrow(0, s.lm_batch, s.lm_batch)).mean();
      opt.zero_grad();
      loss.backward();
      opt.step();
      history.push_back(loss.item<double>());
      ctx.progress->step();
    }
    lm->eval();
  }
  seconds["task_adapter"] = seconds_since(stage_start);
  stage_start = std::chrono::steady_clock::now();
  // Share of pairs whose original the model (with the active modules) scores as more likely.
  auto pair_accuracy = [&](const EncodedPairs& ids) {
    const auto a = mean_nll(*lm, ids.first, 64), b = mean_nll(*lm, ids.second, 64);
    int64_t right = 0;
    for (size_t k = 0; k < a.size(); ++k) right += a[k] < b[k];
    return a.empty() ? std::nan("") : static_cast<double>(right) / static_cast<double>(a.size());
  };
  const double train_accuracy = pair_accuracy(encode_pairs(std::vector<WordOrderPair>(
      en_train.begin(), en_train.begin() + std::min<size_t>(en_train.size(), 600))));
  nlohmann::json rows = nlohmann::json::array();
  std::vector<double> none, with_en, madx, backbone_only;
  std::vector<std::string> names;
  int better = 0, compared = 0;
  for (const auto& l : langs) {
    const auto& pairs = tests.at(l.language);
    const EncodedPairs d = encode_pairs(pairs);  // once, for the four conditions
    lm_set.set_active("word-order", false);
    use_language(lm_set, langs, "");
    const double z = pair_accuracy(d);
    lm_set.set_active("word-order", true);
    const double a = pair_accuracy(d);
    use_language(lm_set, langs, "en");
    const double b = pair_accuracy(d);
    use_language(lm_set, langs, l.language);
    const double c = pair_accuracy(d);
    rows.push_back({{"language", l.language},
                    {"test_pairs", pairs.size()},
                    {"backbone_alone", z},
                    {"no_language_adapter", a},
                    {"english_adapter", b},
                    {"madx", c}});
    none.push_back(a), with_en.push_back(b), madx.push_back(c), backbone_only.push_back(z),
        names.push_back(l.language);
    if (l.language != "en") ++compared, better += c > b;
  }
  result["task"] = {{"name",
                     "word order: which of two orders of a sentence's words (lower-cased, no punctuation) is "
                     "the original, by the decoder's mean next-token loss"},
                    {"train_pairs", en_train.size()},
                    {"steps", s.text_task_steps},
                    {"english_train_accuracy", train_accuracy},
                    {"loss", history}};
  result["languages"] = rows;
  seconds["zero_shot_evaluation"] = seconds_since(stage_start);
  result["seconds"] = seconds;
  ctx.results["crosslingual"] = result;

  // Files for `mdl serve`: the decoder with its tokenizer, and every module (language adapters and the
  // task adapter, stackable per request, e.g. "lang-de,word-order").
  const std::string model_dir = (fs::path(ctx.models_dir) / "polyglot").string();
  save_model(*lm, model_dir);
  io::write_text_atomic((fs::path(model_dir) / "tokenizer.json").string(),
                        io::read_text((fs::path(dir) / "tokenizer.json").string()));
  for (const auto& name : lm_set.names())
    lm_set.save(name, (fs::path(ctx.modules_dir) / "text" / name).string());
  ctx.results["serve_command"] = mdl_command() + " serve --model " + model_dir + " --modules " +
                                 (fs::path(ctx.modules_dir) / "text").string();
  ctx.results["serve_example"] =
      "curl -s localhost:8080/v1/completions -d '{\"model\": \"lang-de\", "
      "\"prompt\": \"der hund\", \"max_tokens\": 12}'";

  PlotOptions plot;
  plot.title = "Zero-shot word-order accuracy by language (task adapter trained on English pairs)";
  plot.y_label = "accuracy";
  write_bar_plot((fs::path(ctx.figures_dir) / "crosslingual_accuracy.svg").string(), names,
                 {"decoder alone", "task adapter, no language adapter", "task adapter on the English adapter",
                  "MAD-X (task adapter on the language's own adapter)"},
                 {backbone_only, none, with_en, madx}, plot);
  ctx.figure(
      "crosslingual", "figures/crosslingual_accuracy.svg",
      "Share of pairs whose original order the model finds more likely, per language: the decoder alone; the "
      "English task adapter alone, on the English adapter, on the language's own adapter");
  plot = PlotOptions();
  plot.title = "Multilingual decoder: pretraining loss";
  plot.x_label = "step", plot.y_label = "loss";
  write_line_plot((fs::path(ctx.figures_dir) / "polyglot_pretraining_loss.svg").string(),
                  {step_series("pretraining", info["loss"].get<std::vector<double>>())}, plot);
  ctx.figure("crosslingual", "figures/polyglot_pretraining_loss.svg",
             "Pretraining loss of the multilingual decoder");
  plot.title = "English task adapter: training loss (pairwise)";
  write_line_plot((fs::path(ctx.figures_dir) / "task_adapter_loss.svg").string(),
                  {step_series("task adapter", history)}, plot);
  ctx.figure("crosslingual", "figures/task_adapter_loss.svg",
             "Training loss of the English word-order adapter");
  ctx.check("the English task adapter learns the task (English test accuracy above the decoder's alone)",
            with_en.front() > backbone_only.front(),
            "English test " + pct(with_en.front()) + " vs " + pct(backbone_only.front()) +
                " for the decoder alone, training " + pct(train_accuracy));
  ctx.check("the MAD-X stack beats the English adapter on most languages",
            compared > 0 && 2 * better > compared,
            std::to_string(better) + " of " + std::to_string(compared) + " languages");
}

}  // namespace mdl::demo
