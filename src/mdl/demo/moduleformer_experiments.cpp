// Experiment 8 of the demo: ModuleFormer (Shen et al., 2023) as a character-level language model on the
// English fortunes, then the German ones; every model is a ModuleFormerForCausalLM trained by mdl's own
// trainer (train_base), on bytes.
//   1. aux loss none vs mutual information vs switch at the same budget: validation loss, and per mixture
//      H(e|x) (how sure each token's routing is) and H(e) (how evenly the experts are used)
//   2. continual learning: 4 experts added to every mixture of the MI model and only they (and their router
//      rows) trained on German (freeze_old_experts), against a dense model of the same active size
//      fine-tuned whole on German: how much English loss each gives up
//   3. pruning: the MI model fine-tuned on German with the load-concentration loss, then only the 4 most
//      used MLP experts of each layer kept, against 4 random ones
//   4. the dense model as a baseline throughout, with the throughput of both
#include <ATen/ATen.h>
#include <torch/torch.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <map>
#include <numeric>
#include <random>
#include <tuple>

#include "mdl/backbones/mixture_of_attention.h"
#include "mdl/backbones/moduleformer_experts.h"
#include "mdl/core/error.h"
#include "mdl/demo/demo_context.h"
#include "mdl/modules/module_set.h"
#include "mdl/report/plot.h"
#include "mdl/routing/routing_log.h"
#include "mdl/training/evaluation.h"

namespace fs = std::filesystem;

namespace mdl::demo {
namespace {

/// Chunks of a language's fortunes as bytes: training and validation examples of seq_len tokens.
struct Text {
  Dataset train, valid;
};

Text read_text(const Context& ctx, const std::string& language) {
  auto entries = fortunes_of(ctx, language);
  std::shuffle(entries.begin(), entries.end(), std::mt19937_64(ctx.options.seed + 17));
  const Sizes& s = ctx.sizes;
  const size_t want = static_cast<size_t>((s.mf_train_chunks + s.mf_valid_chunks) * s.mf_seq_len);
  std::string stream;
  for (const auto& e : entries) {
    if (stream.size() >= want) break;
    stream += e + "\n";
  }
  Text t;
  const int64_t T = s.mf_seq_len;
  const int64_t chunks = static_cast<int64_t>(stream.size()) / T;
  MDL_CHECK(chunks >= 2, "[demo] the ", language, " fortunes hold only ", stream.size(), " bytes");
  const int64_t valid = std::min<int64_t>(s.mf_valid_chunks, chunks / 5 + 1);
  for (int64_t c = 0; c < chunks; ++c) {
    Example e;
    for (int64_t i = 0; i < T; ++i) e.ids.push_back(static_cast<unsigned char>(stream[c * T + i]));
    e.targets = e.ids;
    e.line = c + 1;
    (c < valid ? t.valid : t.train).examples.push_back(std::move(e));
  }
  return t;
}

/// The ModuleFormer of the study (or, with `dense`, the model of the same active size: one attention
/// expert as wide as two and one MLP expert as wide as two, so every token runs the same number of weights).
ModelConfig moduleformer_config(const Sizes& s, bool dense, const std::string& aux, double weight) {
  nlohmann::json j = {{"model_type", "moduleformer"},
                      {"architectures", {"ModuleFormerForCausalLM"}},
                      {"vocab_size", 256},
                      {"n_embd", s.mf_hidden},
                      {"n_layer", s.mf_layers},
                      {"n_head", dense ? 2 * s.mf_heads : s.mf_heads},
                      {"att_hidden", dense ? 2 * s.mf_att_hidden : s.mf_att_hidden},
                      {"ffd_hidden", dense ? 2 * s.mf_ffd_hidden : s.mf_ffd_hidden},
                      {"n_att_experts", dense ? 1 : s.mf_experts},
                      {"k_att", dense ? 1 : 2},
                      {"n_mlp_experts", dense ? 1 : s.mf_experts},
                      {"k_mlp", dense ? 1 : 2},
                      {"gate_type", "linear"},
                      {"aux_loss_type", aux},
                      {"aux_loss_weight", weight},
                      {"block_size", s.mf_seq_len},
                      {"history_length", s.mf_seq_len},
                      {"bos_token_id", 10},
                      {"eos_token_id", 10}};
  return parse_model_config(j.dump(), "the demo's ModuleFormer");
}

Model fresh_model(const Context& ctx, const ModelConfig& c) {
  Model m = create_model(c);
  m->init_weights(ctx.options.seed + 5);
  m->to(ctx.device);
  return m;
}

std::vector<TrainMetrics> train_model(Context& ctx, Model model, const Dataset& data, int64_t steps,
                                      const std::string& stage, bool freeze_old = false) {
  ModuleSet set(model);
  TrainOptions o = train_options(ctx, steps, 3e-3, ctx.sizes.mf_batch, /*train_base=*/true);
  o.freeze_old_experts = freeze_old;
  return train(ctx, set, {}, o, data, stage);
}

/// Mean cross-entropy (nats per byte) on `data`.
double loss_on(Model& model, const Dataset& data) {
  return std::log(evaluate_metrics(*model, data, 32).perplexity);
}

/// Each mixture's H(e|x), H(e) and load over one forward of the validation chunks.
nlohmann::json routing_on(Model& model, const Dataset& data) {
  std::vector<int64_t> which(std::min<size_t>(data.examples.size(), 64));
  std::iota(which.begin(), which.end(), 0);
  torch::NoGradGuard no_grad;
  model->eval();
  Batch b = collate(data, which, 0, model->device(), {});
  ModelInput in = model_input(b);
  RoutingLog log;
  in.routing_log = &log;
  model->forward(in);
  nlohmann::json out = nlohmann::json::array();
  for (const auto& s : log.stats())
    out.push_back({{"site", s.site}, {"h_e_given_x", s.entropy}, {"h_e", s.usage_entropy}, {"load", s.load}});
  return out;
}

double mean_of(const nlohmann::json& routing, const char* key) {
  double sum = 0;
  for (const auto& r : routing) sum += r[key].get<double>();
  return routing.empty() ? 0.0 : sum / static_cast<double>(routing.size());
}

/// Tokens per second of forwards over the validation chunks (evaluation mode, no gradients): the best of
/// three windows of at least 0.3 s, so a busy moment of the machine does not decide it.
double tokens_per_second(Model& model, const Dataset& data) {
  std::vector<int64_t> which(std::min<size_t>(data.examples.size(), 32));
  std::iota(which.begin(), which.end(), 0);
  torch::NoGradGuard no_grad;
  model->eval();
  ModelInput in = model_input(collate(data, which, 0, model->device(), {}));
  model->forward(in);  // warm-up
  double best = 0;
  for (int window = 0; window < 3; ++window) {
    const auto start = std::chrono::steady_clock::now();
    int runs = 0;
    do {
      model->forward(in);
      ++runs;
    } while (seconds_since(start) < 0.3 || runs < 2);
    best = std::max(best, static_cast<double>(runs * in.input_ids.numel()) / seconds_since(start));
  }
  return best;
}

}  // namespace

int64_t planned_moduleformer_steps(const Sizes& s) {
  return 4 * s.mf_steps + 2 * s.mf_continual_steps + s.mf_prune_steps;
}

void run_moduleformer(Context& ctx) {
  const Sizes& s = ctx.sizes;
  const auto start = std::chrono::steady_clock::now();
  const Text en = read_text(ctx, "en"), de = read_text(ctx, "de");
  nlohmann::json result;
  result["data"] = {{"english_train_chunks", en.train.examples.size()},
                    {"english_valid_chunks", en.valid.examples.size()},
                    {"german_train_chunks", de.train.examples.size()},
                    {"german_valid_chunks", de.valid.examples.size()},
                    {"bytes_per_chunk", s.mf_seq_len}};

  // 1. The auxiliary loss.
  std::vector<Series> curves;
  std::map<std::string, Model> models;
  nlohmann::json aux = nlohmann::json::array();
  for (const auto& [name, type, weight] : std::vector<std::tuple<std::string, std::string, double>>{
           {"none", "mi", 0.0}, {"MI", "mi", s.mf_mi_weight}, {"switch", "switch", s.mf_switch_weight}}) {
    Model m = fresh_model(ctx, moduleformer_config(s, false, type, weight));
    const auto history = train_model(ctx, m, en.train, s.mf_steps, "ModuleFormer, aux " + name);
    curves.push_back(step_series(name, losses(history)));
    const nlohmann::json routing = routing_on(m, en.valid);
    aux.push_back({{"aux", name},
                   {"type", type},
                   {"weight", weight},
                   {"valid_loss", loss_on(m, en.valid)},
                   {"h_e_given_x", mean_of(routing, "h_e_given_x")},
                   {"h_e", mean_of(routing, "h_e")},
                   {"per_mixture", routing}});
    models[name] = m;
  }
  result["aux_losses"] = aux;
  result["log_experts"] = std::log(static_cast<double>(s.mf_experts));

  // 4. The dense model of the same active size, trained alike.
  Model dense = fresh_model(ctx, moduleformer_config(s, true, "mi", 0.0));
  const auto dense_history = train_model(ctx, dense, en.train, s.mf_steps, "dense baseline");
  curves.push_back(step_series("dense", losses(dense_history)));
  Model& mi = models["MI"];
  const double mi_en = aux[1]["valid_loss"], dense_en = loss_on(dense, en.valid);
  int64_t mf_active = 0;
  {
    const ModelConfig& c = mi->config();
    const int64_t C = c.hidden_size;
    mf_active = mi->num_parameters() - c.n_layer * ((c.num_att_experts - 2) * 2 * C * c.att_hidden +
                                                    (c.num_experts - 2) * 2 * C * c.intermediate_size);
  }
  result["dense_baseline"] = {{"valid_loss", dense_en},
                              {"parameters", dense->num_parameters()},
                              {"tokens_per_second", tokens_per_second(dense, en.valid)},
                              {"moduleformer_parameters", mi->num_parameters()},
                              {"moduleformer_active_parameters", mf_active},
                              {"moduleformer_tokens_per_second", tokens_per_second(mi, en.valid)},
                              {"moduleformer_valid_loss", mi_en}};

  // 2. Continual learning on German.
  const double mi_de_before = loss_on(mi, de.valid), dense_de_before = loss_on(dense, de.valid);
  Model grown = add_experts(*mi, {s.mf_added_experts, s.mf_added_experts}, ctx.options.seed + 9);
  const double grown_en_before = loss_on(grown, en.valid);
  const auto grown_history =
      train_model(ctx, grown, de.train, s.mf_continual_steps, "ModuleFormer: new experts on German", true);
  int64_t trained = 0;  // what freeze_old_experts let train: the new experts and their router rows
  for (const auto& slice : new_expert_slices(*grown))
    trained += (slice.param.size(0) - slice.frozen) * (slice.param.numel() / slice.param.size(0));
  result["continual"] = {{"added_experts_per_mixture", s.mf_added_experts}};
  // The dense model is fine-tuned in place: its English loss before is dense_en, measured above.
  const auto dense_ft_history =
      train_model(ctx, dense, de.train, s.mf_continual_steps, "dense: fine-tuned on German");
  const double grown_en = loss_on(grown, en.valid), grown_de = loss_on(grown, de.valid);
  const double dense_en_after = loss_on(dense, en.valid), dense_de_after = loss_on(dense, de.valid);
  result["continual"]["moduleformer"] = {{"english_before", mi_en},
                                         {"english_with_new_experts_untrained", grown_en_before},
                                         {"english_after", grown_en},
                                         {"german_before", mi_de_before},
                                         {"german_after", grown_de},
                                         {"trained_parameters", trained},
                                         {"parameters", grown->num_parameters()},
                                         {"loss", losses(grown_history)}};
  result["continual"]["dense"] = {{"english_before", dense_en},
                                  {"english_after", dense_en_after},
                                  {"german_before", dense_de_before},
                                  {"german_after", dense_de_after},
                                  {"loss", losses(dense_ft_history)}};

  // 3. Pruning after load-concentration fine-tuning on German.
  RouterOptions concentrate = moduleformer_router(2);
  concentrate.concentration_coef = s.mf_concentration_weight;
  mi->set_router(concentrate);
  train_model(ctx, mi, de.train, s.mf_prune_steps, "ModuleFormer: concentration on German");
  const double tuned_de = loss_on(mi, de.valid);
  const ExpertUsage usage = measure_expert_usage(*mi, de.valid);
  const auto kept = most_used(usage.mlp, s.mf_keep_experts);
  std::vector<std::vector<int64_t>> random_kept;
  std::mt19937_64 rng(ctx.options.seed + 23);
  for (size_t l = 0; l < usage.mlp.size(); ++l) {
    std::vector<int64_t> all(usage.mlp[l].size());
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(static_cast<size_t>(s.mf_keep_experts));
    std::sort(all.begin(), all.end());
    random_kept.push_back(all);
  }
  Model pruned = keep_experts(*mi, {}, kept), random_pruned = keep_experts(*mi, {}, random_kept);
  const double pruned_de = loss_on(pruned, de.valid), random_de = loss_on(random_pruned, de.valid);
  result["pruning"] = {{"kept_per_layer", s.mf_keep_experts},
                       {"of", s.mf_experts},
                       {"german_before_pruning", tuned_de},
                       {"german_most_used", pruned_de},
                       {"german_random", random_de},
                       {"most_used", kept},
                       {"random", random_kept},
                       {"mlp_usage", usage.mlp},
                       {"parameters_before", mi->num_parameters()},
                       {"parameters_after", pruned->num_parameters()},
                       {"tokens_per_second_before", tokens_per_second(mi, de.valid)},
                       {"tokens_per_second_after", tokens_per_second(pruned, de.valid)}};
  result["seconds"] = seconds_since(start);
  ctx.results["moduleformer"] = result;

  // Figures.
  PlotOptions plot;
  plot.title = "ModuleFormer on English bytes: training loss by auxiliary loss, and the dense baseline";
  plot.x_label = "step", plot.y_label = "loss (nats per byte)";
  write_line_plot((fs::path(ctx.figures_dir) / "moduleformer_loss.svg").string(), curves, plot);
  ctx.figure("moduleformer", "figures/moduleformer_loss.svg",
             "Training loss: no aux loss, MI, switch; dense");
  std::vector<std::string> mixtures;
  for (const auto& r : aux[0]["per_mixture"]) mixtures.push_back(r["site"].get<std::string>().substr(14));
  for (const char* key : {"h_e_given_x", "h_e"}) {
    std::vector<std::vector<double>> values;
    for (const auto& a : aux) {
      std::vector<double> v;
      for (const auto& r : a["per_mixture"]) v.push_back(r[key]);
      values.push_back(v);
    }
    plot = PlotOptions();
    const bool cond = std::string(key) == "h_e_given_x";
    plot.title = cond ? "Routing entropy per token H(e|x) (low: each token sure of its experts)"
                      : "Expert-use entropy H(e) (high: experts used evenly; log E = " +
                            number(result["log_experts"]) + ")";
    plot.y_label = "nats";
    const std::string file = std::string("figures/moduleformer_") + key + ".svg";
    write_bar_plot((fs::path(ctx.figures_dir) / fs::path(file).filename()).string(), mixtures,
                   {"none", "MI", "switch"}, values, plot);
    ctx.figure(
        "moduleformer", file,
        cond ? "H(e|x) per mixture (layer.attn / layer.mlpf) by aux loss" : "H(e) per mixture by aux loss");
  }
  {
    std::vector<std::string> rows, cols;
    std::vector<std::vector<double>> load;
    for (const auto& r : aux[1]["per_mixture"]) {
      rows.push_back(r["site"].get<std::string>().substr(14));
      load.push_back(r["load"].get<std::vector<double>>());
    }
    for (int64_t e = 0; e < s.mf_experts; ++e) cols.push_back("e" + std::to_string(e));
    plot = PlotOptions();
    plot.title = "Expert load of the MI model on English validation text (share of assignments)";
    write_heatmap((fs::path(ctx.figures_dir) / "moduleformer_load.svg").string(), rows, cols, load, plot);
    ctx.figure("moduleformer", "figures/moduleformer_load.svg", "Expert load per mixture, MI model");
  }
  plot = PlotOptions();
  plot.title = "Continual learning on German: English loss before and after";
  plot.y_label = "English validation loss";
  write_bar_plot((fs::path(ctx.figures_dir) / "moduleformer_continual.svg").string(),
                 {"before", "after German"}, {"ModuleFormer + new experts (old frozen)", "dense, fine-tuned"},
                 {{mi_en, grown_en}, {dense_en, dense_en_after}}, plot);
  ctx.figure("moduleformer", "figures/moduleformer_continual.svg",
             "Forgetting: English loss after German training");
  plot = PlotOptions();
  plot.title = "Pruning to " + std::to_string(s.mf_keep_experts) + " of " + std::to_string(s.mf_experts) +
               " MLP experts per layer: German validation loss";
  plot.y_label = "German validation loss";
  write_bar_plot((fs::path(ctx.figures_dir) / "moduleformer_pruning.svg").string(), {"German"},
                 {"all experts", "most used kept", "random kept"}, {{tuned_de}, {pruned_de}, {random_de}},
                 plot);
  ctx.figure("moduleformer", "figures/moduleformer_pruning.svg", "Pruning: most used vs random experts");

  // The expected directions.
  const nlohmann::json &none = aux[0], &mi_row = aux[1], &sw = aux[2];
  const double log_e = result["log_experts"];
  ctx.check(
      "ModuleFormer: the MI loss makes routing near-deterministic (H(e|x) below no aux loss's and "
      "switch's) while the experts stay evenly used (H(e) >= 0.9 log E)",
      mi_row["h_e_given_x"].get<double>() < none["h_e_given_x"].get<double>() &&
          mi_row["h_e_given_x"].get<double>() < sw["h_e_given_x"].get<double>() &&
          mi_row["h_e"].get<double>() >= 0.9 * log_e,
      "H(e|x) none " + number(none["h_e_given_x"]) + ", MI " + number(mi_row["h_e_given_x"]) + ", switch " +
          number(sw["h_e_given_x"]) + "; H(e) MI " + number(mi_row["h_e"]) + " of log E " + number(log_e));
  ctx.check(
      "ModuleFormer: switch balances the experts (H(e) at least no aux loss's) but stays soft (H(e|x) "
      "above MI's)",
      sw["h_e"].get<double>() >= none["h_e"].get<double>() - 1e-3 &&
          sw["h_e_given_x"].get<double>() > mi_row["h_e_given_x"].get<double>(),
      "H(e) none " + number(none["h_e"]) + ", switch " + number(sw["h_e"]) + "; H(e|x) switch " +
          number(sw["h_e_given_x"]) + " vs MI " + number(mi_row["h_e_given_x"]));
  ctx.check(
      "ModuleFormer: MI routing costs little loss (validation loss within 3% of no aux loss's)",
      mi_row["valid_loss"].get<double>() <= 1.03 * none["valid_loss"].get<double>(),
      "MI " + number(mi_row["valid_loss"]) + " vs none " + number(none["valid_loss"]) + " nats per byte");
  ctx.check("ModuleFormer: new experts for German forget less English than fine-tuning a dense model",
            grown_en - mi_en < dense_en_after - dense_en,
            "English loss rise: new experts " + number(grown_en - mi_en) + " (German " +
                number(mi_de_before) + " -> " + number(grown_de) + "), dense " +
                number(dense_en_after - dense_en) + " (German " + number(dense_de_before) + " -> " +
                number(dense_de_after) + ")");
  ctx.check(
      "ModuleFormer: after concentration fine-tuning, keeping the most used experts keeps more than "
      "keeping random ones",
      pruned_de < random_de,
      "German loss: all " + number(tuned_de) + ", most used " + number(pruned_de) + ", random " +
          number(random_de));
}

}  // namespace mdl::demo
