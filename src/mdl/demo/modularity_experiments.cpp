// Experiment 9 of the demo: "Is a modular architecture enough?" (Mittal, Bengio and Lajoie, 2022) on the
// MLP rule task (y = alpha_c a + beta_c b, L1): monolithic, modular, modular-op and GT-modular models for
// R in {2, 4, 8} rules and two seeds, with in- and out-of-distribution loss and the specialisation
// metrics of their routing (routing/specialisation.h).
#include <ATen/ATen.h>
#include <torch/optim/adam.h>
#include <torch/utils.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>

#include "mdl/demo/demo_context.h"
#include "mdl/modularity/rule_data.h"
#include "mdl/modularity/rule_models.h"
#include "mdl/report/plot.h"
#include "mdl/routing/specialisation.h"

namespace fs = std::filesystem;

namespace mdl::demo {
namespace {

/// A rule model's step costs a small fraction of a backbone's: the progress bar counts them in ticks of this
/// many, so its percentage follows time.
constexpr int64_t kStepsPerTick = 25;

const std::vector<std::string>& families() {
  static const std::vector<std::string> f = {"monolithic", "modular", "modular_op", "gt"};
  return f;
}

struct Run {
  double id_loss = 0, ood_loss = 0;
  SpecialisationMetrics metrics;
  bool routed = false;
};

/// One model of `family` on `task` (mlp, mha, rnn) with R rules, trained and measured.
Run train_and_measure(Context& ctx, const std::string& task, const std::string& family, int64_t R,
                      uint64_t seed) {
  const Sizes& s = ctx.sizes;
  RuleDataOptions d;
  d.task = task;
  d.rules = R;
  d.data_seed = seed;
  d.sample_seed = 1000 + seed;
  RuleData data(d);
  std::shared_ptr<torch::nn::Module> model;
  std::function<RuleOutput(const at::Tensor&)> forward;
  if (task == "mlp") {
    RuleModelOptions o;
    o.family = family;
    o.rules = o.modules = R;
    o.encoder = s.md_encoder;
    o.dim = s.md_dim;
    RuleMlpModel m(o, 7 + seed);
    model = m.ptr();
    forward = [m](const at::Tensor& x) mutable { return m->forward(x); };
  } else {
    RuleSequenceOptions o;
    o.task = task;
    o.family = family;
    o.rules = R;
    o.input = (task == "mha" ? 4 * R : d.dim) + R;
    o.output = task == "mha" ? 1 : d.dim;
    o.dim = task == "mha" ? 64 : s.md_encoder;
    o.hidden = s.md_encoder * 2;
    RuleSequenceModel m(o, 7 + seed);
    model = m.ptr();
    forward = [m](const at::Tensor& x) mutable { return m->forward(x); };
  }
  torch::optim::Adam adam(model->parameters(), torch::optim::AdamOptions(s.md_lr));
  const int64_t batch = task == "mlp" ? s.md_batch : std::max<int64_t>(1, s.md_batch / 4);
  for (int64_t step = 0; step < s.md_steps; ++step) {
    const RuleBatch b = data.sample(batch);
    adam.zero_grad();
    at::l1_loss(forward(b.input).prediction, b.target).backward();
    adam.step();
    if ((step + 1) % kStepsPerTick == 0) ctx.progress->step();
  }
  torch::NoGradGuard no_grad;
  model->eval();
  Run run;
  // Held-out samples from a stream of their own: in distribution, and with the free inputs doubled.
  RuleDataOptions test = d;
  test.sample_seed = 5000 + seed;
  RuleData fresh(test);
  std::vector<at::Tensor> probs, rules;
  const int64_t eval_n = task == "mlp" ? 1000 : 100;
  for (int64_t i = 0; i < s.md_eval_batches; ++i) {
    const RuleBatch id = fresh.sample(eval_n), ood = fresh.sample(eval_n, 2.0);
    const RuleOutput out = forward(id.input);
    run.id_loss += at::l1_loss(out.prediction, id.target).item<double>() / s.md_eval_batches;
    run.ood_loss += at::l1_loss(forward(ood.input).prediction, ood.target).item<double>() / s.md_eval_batches;
    if (out.routing.defined())
      probs.push_back(out.routing.reshape({-1, R})), rules.push_back(id.rule.reshape({-1}));
  }
  if (!probs.empty()) {
    run.routed = true;
    run.metrics = specialisation(at::cat(probs), at::cat(rules), R, seed);
  }
  return run;
}

}  // namespace

int64_t planned_modularity_steps(const Sizes& s) {
  return (static_cast<int64_t>(s.md_rules.size()) * s.md_seeds +
          static_cast<int64_t>(s.md_sequence_tasks.size() * s.md_sequence_rules.size())) *
         static_cast<int64_t>(families().size()) * (s.md_steps / kStepsPerTick);
}

void run_modularity(Context& ctx) {
  const Sizes& s = ctx.sizes;
  ctx.progress->stage("modularity: rule MLPs, 4 families", planned_modularity_steps(s));
  const auto start = std::chrono::steady_clock::now();
  nlohmann::json result = {{"task", "MLP regression (L1), y = alpha_c a + beta_c b"},
                           {"steps", s.md_steps},
                           {"batch", s.md_batch},
                           {"encoder", s.md_encoder},
                           {"dim", s.md_dim},
                           {"seeds", s.md_seeds},
                           {"rules", s.md_rules}};
  // [family][R] -> mean over seeds
  std::map<std::string, std::map<int64_t, Run>> mean;
  nlohmann::json runs = nlohmann::json::array();
  for (int64_t R : s.md_rules)
    for (const auto& family : families()) {
      Run avg;
      for (int64_t seed = 0; seed < s.md_seeds; ++seed) {
        const Run r = train_and_measure(ctx, "mlp", family, R, static_cast<uint64_t>(seed));
        nlohmann::json row = {{"family", family},
                              {"rules", R},
                              {"seed", seed},
                              {"id_loss", r.id_loss},
                              {"ood_loss", r.ood_loss}};
        if (r.routed) row["metrics"] = r.metrics;
        runs.push_back(row);
        const double w = 1.0 / static_cast<double>(s.md_seeds);
        avg.id_loss += w * r.id_loss, avg.ood_loss += w * r.ood_loss, avg.routed = r.routed;
        avg.metrics.collapse_avg += w * r.metrics.collapse_avg;
        avg.metrics.collapse_worst += w * r.metrics.collapse_worst;
        avg.metrics.inverse_mi += w * r.metrics.inverse_mi;
        avg.metrics.alignment += w * r.metrics.alignment;
        avg.metrics.adaptation += w * r.metrics.adaptation;
        avg.metrics.rules = avg.metrics.modules = R;
      }
      mean[family][R] = avg;
    }
  result["runs"] = runs;
  // --full: the sequence tasks too (one seed; loss and metrics per family and R).
  nlohmann::json sequences = nlohmann::json::array();
  for (const auto& task : s.md_sequence_tasks)
    for (int64_t R : s.md_sequence_rules)
      for (const auto& family : families()) {
        const Run r = train_and_measure(ctx, task, family, R, 0);
        nlohmann::json row = {{"task", task},
                              {"family", family},
                              {"rules", R},
                              {"id_loss", r.id_loss},
                              {"ood_loss", r.ood_loss}};
        if (r.routed) row["metrics"] = r.metrics;
        sequences.push_back(row);
      }
  if (!sequences.empty()) result["sequence_tasks"] = sequences;
  nlohmann::json summary = nlohmann::json::array();
  for (const auto& family : families())
    for (int64_t R : s.md_rules) {
      const Run& r = mean[family][R];
      nlohmann::json row = {
          {"family", family}, {"rules", R}, {"id_loss", r.id_loss}, {"ood_loss", r.ood_loss}};
      if (r.routed) row["metrics"] = r.metrics;
      summary.push_back(row);
    }
  result["mean_over_seeds"] = summary;
  nlohmann::json random = nlohmann::json::object();
  for (int64_t R : s.md_rules) random[std::to_string(R)] = random_routing(R, R);
  result["random_routing"] = random;
  result["seconds"] = seconds_since(start);
  ctx.results["modularity"] = result;

  // Figures: loss per family against R, and each metric against R for the routed families.
  std::vector<double> xs(s.md_rules.begin(), s.md_rules.end());
  for (const char* key : {"id_loss", "ood_loss"}) {
    std::vector<Series> curves;
    for (const auto& family : families()) {
      Series c{family, xs, {}};
      for (int64_t R : s.md_rules)
        c.y.push_back(key == std::string("id_loss") ? mean[family][R].id_loss : mean[family][R].ood_loss);
      curves.push_back(c);
    }
    PlotOptions plot;
    const bool id = key == std::string("id_loss");
    plot.title =
        std::string(id ? "In-distribution" : "Out-of-distribution (a, b doubled)") + " L1 loss by family";
    plot.x_label = "rules R", plot.y_label = "L1 loss";
    plot.log_y = true;
    const std::string file = std::string("figures/modularity_") + key + ".svg";
    write_line_plot((fs::path(ctx.figures_dir) / fs::path(file).filename()).string(), curves, plot);
    ctx.figure("modularity", file,
               std::string(id ? "In" : "Out-of") + "-distribution loss against the number of rules");
  }
  std::vector<Series> metric_curves;
  for (const auto& family : {"modular", "modular_op"})
    for (const auto& [metric, name] : std::vector<std::pair<std::string, std::string>>{
             {"collapse_avg", "collapse-avg"}, {"inverse_mi", "inverse MI"}, {"alignment", "alignment"}}) {
      Series c{std::string(family) + " " + name, xs, {}};
      for (int64_t R : s.md_rules) {
        const SpecialisationMetrics& m = mean[family][R].metrics;
        c.y.push_back(metric == "collapse_avg" ? m.collapse_avg
                      : metric == "inverse_mi" ? m.inverse_mi
                                               : m.alignment);
      }
      metric_curves.push_back(c);
    }
  PlotOptions plot;
  plot.title = "Specialisation metrics against R (lower is better; GT-modular scores 0)";
  plot.x_label = "rules R", plot.y_label = "metric";
  write_line_plot((fs::path(ctx.figures_dir) / "modularity_metrics.svg").string(), metric_curves, plot);
  ctx.figure("modularity", "figures/modularity_metrics.svg", "Collapse, inverse MI and alignment against R");

  // The paper's directions.
  const std::vector<int64_t>& Rs = s.md_rules;
  int gt_best = 0, comparisons = 0, modular_wins = 0;
  for (int64_t R : Rs) {
    for (const char* key : {"id", "ood"}) {
      auto loss = [&](const std::string& f) {
        return key == std::string("id") ? mean[f][R].id_loss : mean[f][R].ood_loss;
      };
      ++comparisons;
      gt_best += loss("gt") <= std::min({loss("monolithic"), loss("modular"), loss("modular_op")});
      modular_wins += loss("modular") < loss("monolithic");
    }
  }
  const int64_t lo = Rs.front(), hi = Rs.back();
  auto gain = [&](int64_t R) { return mean["monolithic"][R].ood_loss - mean["modular"][R].ood_loss; };
  ctx.check("modularity: GT-modular is best (lowest loss) in most comparisons", 2 * gt_best > comparisons,
            std::to_string(gt_best) + " of " + std::to_string(comparisons) +
                " (in and out of distribution, R = " + std::to_string(lo) + ".." + std::to_string(hi) + ")");
  ctx.check("modularity: modular beats monolithic in most comparisons", 2 * modular_wins > comparisons,
            std::to_string(modular_wins) + " of " + std::to_string(comparisons));
  ctx.check(
      "modularity: the benefit of modularity grows with R (monolithic minus modular OoD loss larger at R = " +
          std::to_string(hi) + " than at R = " + std::to_string(lo) + ")",
      gain(hi) > gain(lo),
      "R = " + std::to_string(lo) + ": " + number(gain(lo)) + ", R = " + std::to_string(hi) + ": " +
          number(gain(hi)));
  const SpecialisationMetrics &mlo = mean["modular"][lo].metrics, &mhi = mean["modular"][hi].metrics;
  ctx.check("modularity: specialisation worsens with R (modular's alignment higher at R = " +
                std::to_string(hi) + ")",
            mhi.alignment > mlo.alignment,
            "alignment " + number(mlo.alignment) + " -> " + number(mhi.alignment) + ", inverse MI " +
                number(mlo.inverse_mi) + " -> " + number(mhi.inverse_mi) + ", collapse-avg " +
                number(mlo.collapse_avg) + " -> " + number(mhi.collapse_avg));
  int op_better = 0, op_compared = 0;
  std::string detail;
  for (const auto& [metric, name] :
       std::vector<std::pair<int, std::string>>{{0, "collapse-avg"}, {1, "inverse MI"}, {2, "alignment"}}) {
    int better = 0;
    for (int64_t R : Rs) {
      auto value = [&](const std::string& f) {
        const SpecialisationMetrics& m = mean[f][R].metrics;
        return metric == 0 ? m.collapse_avg : metric == 1 ? m.inverse_mi : m.alignment;
      };
      better += value("modular_op") < value("modular");
      ++op_compared;
    }
    op_better += better;
    detail += (detail.empty() ? "" : ", ") + name + " " + std::to_string(better) + " of " +
              std::to_string(Rs.size());
  }
  ctx.check(
      "modularity: modular-op collapses less and specialises better than modular (collapse-avg, inverse MI "
      "and alignment over R: most comparisons)",
      2 * op_better > op_compared, detail);
}

}  // namespace mdl::demo
