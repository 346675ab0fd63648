// Experiment 11 of the demo: S2RMs (Rahaman et al., 2021) against a monolithic GRU and RIMs on bouncing
// balls on a ring (recurrent/bouncing_balls.h), seen through V random crops per step; each model predicts
// the next whole frame. Trained with V = 4 and 2 balls; tested with V in {1, 2, 4, 8} and with 4 balls.
#include <ATen/ATen.h>
#include <torch/optim/adam.h>
#include <torch/utils.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>

#include "mdl/demo/demo_context.h"
#include "mdl/recurrent/bouncing_balls.h"
#include "mdl/recurrent/s2rm.h"
#include "mdl/recurrent/world_model.h"
#include "mdl/report/plot.h"
#include "mdl/routing/specialisation.h"

namespace fs = std::filesystem;

namespace mdl::demo {
namespace {

const std::vector<std::string>& kinds() {
  static const std::vector<std::string> k = {"s2rm", "rims", "gru"};
  return k;
}

constexpr int64_t kStepsPerTick = 10;  // a world-model step is cheap: the bar counts ticks of this many
constexpr int64_t kBurnIn = 2;         // steps before the error counts (the state has seen little yet)

WorldModelOptions model_options(const Sizes& s, const std::string& kind, const BouncingBallsOptions& w) {
  WorldModelOptions o;
  o.kind = kind;
  o.modules = s.s2_modules;
  o.feature_dim = w.crop;
  o.location_dim = 2;
  o.output_dim = 1;
  o.hidden = kind == "gru" ? s.s2_hidden * 2 : s.s2_hidden;  // about the modular models' state size
  o.top_k = s.s2_modules / 2;
  o.seed = 11;
  return o;
}

/// Predictions of frames 1..T (B, T, C) from the episodes' views, the state carried across steps.
at::Tensor rollout(WorldModelImpl& m, const BallsEpisodes& e) {
  at::Tensor h = m.initial_state(e.frames.size(0));
  std::vector<at::Tensor> out;
  for (const auto& v : e.views) {
    h = m.step(v, h);
    out.push_back(m.decode(h, e.queries).squeeze(-1));
  }
  return at::stack(out, 1);
}

double error(WorldModelImpl& m, const BallsEpisodes& e) {
  torch::NoGradGuard g;
  const at::Tensor p = rollout(m, e).narrow(1, kBurnIn, static_cast<int64_t>(e.views.size()) - kBurnIn);
  const at::Tensor t = e.frames.narrow(1, 1 + kBurnIn, p.size(1));
  return at::mse_loss(p, t).item<double>();
}

/// Where module m sits on the ring: the cell whose encoded location is nearest its embedding.
std::vector<int64_t> module_places(S2rmImpl& m, BouncingBalls& world) {
  torch::NoGradGuard g;
  const int64_t C = world.options().cells;
  const at::Tensor e = m.encode_locations(world.locations(at::arange(C, at::kFloat)));  // (C, d_s)
  const at::Tensor d = (m.embeddings.unsqueeze(1) - e.unsqueeze(0)).pow(2).sum(-1);     // (M, C)
  const at::Tensor best = d.argmin(1);
  return std::vector<int64_t>(best.data_ptr<int64_t>(), best.data_ptr<int64_t>() + best.numel());
}

/// Which modules take which views: each view's share of its attention over the modules (a view no module
/// reads is left out), labelled by the quarter of the ring the view is centred in; the specialisation
/// metrics of that routing against the quarters (routing/specialisation.h).
SpecialisationMetrics view_routing(WorldModelImpl& m, const BallsEpisodes& e) {
  torch::NoGradGuard g;
  std::vector<at::Tensor> probs, quarters;
  at::Tensor h = m.initial_state(e.frames.size(0));
  for (const auto& v : e.views) {
    StepTrace trace;
    h = m.step(v, h, &trace);
    const at::Tensor a = trace.input_attention.transpose(1, 2).reshape({-1, trace.input_attention.size(1)});
    const at::Tensor total = a.sum(-1, /*keepdim=*/true);  // (B V, 1)
    const at::Tensor read = total.squeeze(-1) > 0;
    const at::Tensor angle = at::atan2(v.locations.select(-1, 1), v.locations.select(-1, 0)).reshape({-1});
    const at::Tensor quarter = ((angle + M_PI) / (M_PI / 2)).floor().clamp(0, 3).to(at::kLong);
    probs.push_back((a / total.clamp_min(1e-12)).index({read}));
    quarters.push_back(quarter.index({read}));
  }
  return specialisation(at::cat(probs), at::cat(quarters), 4);
}

}  // namespace

int64_t planned_s2rm_steps(const Sizes& s) {
  return static_cast<int64_t>(kinds().size()) * (s.s2_steps / kStepsPerTick);
}

void run_s2rm(Context& ctx) {
  const Sizes& s = ctx.sizes;
  const auto start = std::chrono::steady_clock::now();
  ctx.progress->stage("s2rm: S2RMs, RIMs and a GRU on bouncing balls", planned_s2rm_steps(s));
  BouncingBallsOptions wo;
  wo.cells = s.s2_cells;
  wo.seed = 5;
  const std::vector<int64_t> Vs = {1, 2, 4, 8};
  nlohmann::json models = nlohmann::json::object();
  std::map<std::string, std::map<int64_t, double>> err2, err4;  // kind -> V -> error (2 and 4 balls)
  std::map<std::string, std::shared_ptr<WorldModelImpl>> trained;
  std::vector<Series> curves;
  for (const auto& kind : kinds()) {
    auto m = make_world_model(model_options(s, kind, wo));
    BouncingBalls world(wo);  // the same training episodes for every model
    torch::optim::Adam adam(m->parameters(), torch::optim::AdamOptions(s.s2_lr));
    std::vector<double> loss_curve;
    for (int64_t step = 0; step < s.s2_steps; ++step) {
      const BallsEpisodes e = world.sample(s.s2_batch, s.s2_episode_steps, 4, 2);
      adam.zero_grad();
      const at::Tensor loss = at::mse_loss(rollout(*m, e), e.frames.narrow(1, 1, s.s2_episode_steps));
      loss.backward();
      adam.step();
      loss_curve.push_back(loss.item<double>());
      if ((step + 1) % kStepsPerTick == 0) ctx.progress->step();
    }
    m->eval();
    int64_t params = 0;
    for (const auto& p : m->parameters()) params += p.numel();
    nlohmann::json errors = {{"balls_2", nlohmann::json::object()}, {"balls_4", nlohmann::json::object()}};
    for (int64_t V : Vs) {
      BouncingBalls test(BouncingBallsOptions{wo.cells, wo.crop, wo.width, wo.min_speed, wo.max_speed, 99});
      err2[kind][V] = error(*m, test.sample(s.s2_test_episodes, s.s2_episode_steps, V, 2));
      err4[kind][V] = error(*m, test.sample(s.s2_test_episodes, s.s2_episode_steps, V, 4));
      errors["balls_2"][std::to_string(V)] = err2[kind][V];
      errors["balls_4"][std::to_string(V)] = err4[kind][V];
    }
    models[kind] = {{"parameters", params}, {"final_train_loss", loss_curve.back()}, {"test_mse", errors}};
    curves.push_back(step_series(kind, loss_curve));
    trained[kind] = m;
  }
  nlohmann::json out = {
      {"steps", s.s2_steps}, {"batch", s.s2_batch},     {"episode_steps", s.s2_episode_steps},
      {"cells", s.s2_cells}, {"modules", s.s2_modules}, {"train_views", 4},
      {"train_balls", 2},    {"models", models}};

  // Figures: error against V (2 balls, and 4), training loss, S2RMs' kernel, a rollout strip.
  std::vector<Series> by_v2, by_v4;
  for (const auto& kind : kinds()) {
    Series a{kind, {}, {}}, b{kind, {}, {}};
    for (int64_t V : Vs)
      a.x.push_back(V), a.y.push_back(err2[kind][V]), b.x.push_back(V), b.y.push_back(err4[kind][V]);
    by_v2.push_back(a), by_v4.push_back(b);
  }
  PlotOptions p;
  p.x_label = "views per step (V)";
  p.y_label = "next-frame MSE";
  p.title = "Error against V (trained with V = 4, 2 balls)";
  write_line_plot((fs::path(ctx.figures_dir) / "s2rm_error_by_views.svg").string(), by_v2, p);
  ctx.figure("s2rm", "figures/s2rm_error_by_views.svg",
             "Next-frame error against the number of views, 2 balls");
  p.title = "Error against V with 4 balls (trained with 2)";
  write_line_plot((fs::path(ctx.figures_dir) / "s2rm_error_more_balls.svg").string(), by_v4, p);
  ctx.figure("s2rm", "figures/s2rm_error_more_balls.svg", "The same with 4 balls, twice the training number");
  p.title = "Training loss";
  p.x_label = "step";
  p.y_label = "MSE";
  p.log_y = true;
  write_line_plot((fs::path(ctx.figures_dir) / "s2rm_training.svg").string(), curves, p);
  ctx.figure("s2rm", "figures/s2rm_training.svg", "Training loss of the three models");

  auto& s2 = dynamic_cast<S2rmImpl&>(*trained["s2rm"]);
  BouncingBalls probe(BouncingBallsOptions{wo.cells, wo.crop, wo.width, wo.min_speed, wo.max_speed, 123});
  const BallsEpisodes one = probe.sample(1, s.s2_episode_steps, 4, 2);
  StepTrace trace;
  {
    torch::NoGradGuard g;
    s2.step(one.views[0], s2.initial_state(1), &trace);
  }
  const std::vector<int64_t> places = module_places(s2, probe);
  const int64_t M = s.s2_modules, C = s.s2_cells;
  std::vector<std::vector<double>> kernel(static_cast<size_t>(M),
                                          std::vector<double>(static_cast<size_t>(M)));
  std::vector<std::string> names;
  double near_sum = 0, far_sum = 0;
  int64_t near_n = 0, far_n = 0;
  for (int64_t a = 0; a < M; ++a) {
    names.push_back("m" + std::to_string(a) + " @" + std::to_string(places[static_cast<size_t>(a)]));
    for (int64_t b = 0; b < M; ++b) {
      const double k = trace.module_kernel[a][b].item<double>();
      kernel[static_cast<size_t>(a)][static_cast<size_t>(b)] = k;
      if (a == b) continue;
      int64_t d = std::abs(places[static_cast<size_t>(a)] - places[static_cast<size_t>(b)]);
      d = std::min(d, C - d);
      (d <= C / 4 ? near_sum : far_sum) += k;
      (d <= C / 4 ? near_n : far_n) += 1;
    }
  }
  p = PlotOptions();
  p.title = "S2RMs' communication kernel K(s_m, s_m') (modules labelled by their ring cell)";
  write_heatmap((fs::path(ctx.figures_dir) / "s2rm_kernel.svg").string(), names, names, kernel, p);
  ctx.figure("s2rm", "figures/s2rm_kernel.svg", "The learned kernel between modules");
  {
    torch::NoGradGuard g;
    const at::Tensor pred = rollout(s2, one)[0];  // (T, C)
    std::vector<std::vector<double>> truth, guess;
    std::vector<std::string> rows, cols;
    for (int64_t t = 0; t < pred.size(0); ++t) {
      rows.push_back("t" + std::to_string(t + 1));
      std::vector<double> a, b;
      for (int64_t c = 0; c < C; ++c)
        a.push_back(one.frames[0][t + 1][c].item<double>()), b.push_back(pred[t][c].item<double>());
      truth.push_back(a), guess.push_back(b);
    }
    for (int64_t c = 0; c < C; ++c) cols.push_back(c % 4 == 0 ? std::to_string(c) : "");
    p.title = "Rollout: true frames (cells across, steps down)";
    write_heatmap((fs::path(ctx.figures_dir) / "s2rm_rollout_truth.svg").string(), rows, cols, truth, p);
    p.title = "Rollout: S2RMs' predicted frames";
    write_heatmap((fs::path(ctx.figures_dir) / "s2rm_rollout_s2rm.svg").string(), rows, cols, guess, p);
    ctx.figure("s2rm", "figures/s2rm_rollout_truth.svg", "An episode's frames 1..T");
    ctx.figure("s2rm", "figures/s2rm_rollout_s2rm.svg", "S2RMs' predictions of them (V = 4)");
  }
  const double near = near_n ? near_sum / near_n : 0, far = far_n ? far_sum / far_n : 0;
  out["kernel"] = {{"matrix", kernel}, {"module_cells", places}, {"near_mean", near},
                   {"far_mean", far},  {"near_pairs", near_n},   {"far_pairs", far_n}};
  BouncingBalls routing_probe(
      BouncingBallsOptions{wo.cells, wo.crop, wo.width, wo.min_speed, wo.max_speed, 77});
  const BallsEpisodes routed = routing_probe.sample(s.s2_test_episodes, s.s2_episode_steps, 4, 2);
  const SpecialisationMetrics s2_routing = view_routing(*trained["s2rm"], routed);
  const SpecialisationMetrics rims_routing = view_routing(*trained["rims"], routed);
  out["view_routing"] = {{"s2rm", s2_routing},
                         {"rims", rims_routing},
                         {"random", random_routing(4, s.s2_modules)},
                         {"labels", "the ring quarter of each view's centre"}};
  out["seconds"] = seconds_since(start);
  ctx.results["s2rm"] = out;

  // The paper's directions.
  double best4 = 1e300;
  for (const auto& k : kinds()) best4 = std::min(best4, err2[k][4]);
  bool similar = true;
  std::string at4;
  for (const auto& k : kinds()) {
    similar = similar && err2[k][4] <= 1.5 * best4;
    at4 += (at4.empty() ? "" : ", ") + k + " " + number(err2[k][4], "%.4f");
  }
  ctx.check(
      "s2rm: in the training setting (V = 4, 2 balls) the three models are similar (each within 1.5x "
      "of the best)",
      similar, at4);
  auto worst_ratio = [&](const std::string& k) {
    double r = 0;
    for (int64_t V : {1, 2, 8}) r = std::max(r, err2[k][V] / err2[k][4]);
    return r;
  };
  auto ratios = [&](const std::function<double(const std::string&)>& f) {
    std::string d;
    for (const auto& k : kinds()) d += (d.empty() ? "" : ", ") + k + " " + number(f(k), "%.2f") + "x";
    return d;
  };
  ctx.check("s2rm: S2RMs degrade least as V changes (largest error ratio over V = 1, 2, 8 to V = 4)",
            worst_ratio("s2rm") < std::min(worst_ratio("rims"), worst_ratio("gru")), ratios(worst_ratio));
  auto balls_ratio = [&](const std::string& k) { return err4[k][4] / err2[k][4]; };
  ctx.check("s2rm: S2RMs degrade least with 4 balls (trained with 2; error ratio at V = 4)",
            balls_ratio("s2rm") < std::min(balls_ratio("rims"), balls_ratio("gru")), ratios(balls_ratio));
  ctx.check(
      "s2rm: S2RMs route views by where they are (inverse MI between a view's ring quarter and the "
      "modules that read it lower than RIMs')",
      s2_routing.inverse_mi < rims_routing.inverse_mi,
      "inverse MI " + number(s2_routing.inverse_mi) + " vs " + number(rims_routing.inverse_mi) +
          ", alignment " + number(s2_routing.alignment) + " vs " + number(rims_routing.alignment) +
          ", collapse-avg " + number(s2_routing.collapse_avg) + " vs " + number(rims_routing.collapse_avg));
  ctx.check(
      "s2rm: the learned kernel is local (modules near each other on the ring interact more: mean K "
      "of pairs within a quarter ring above that of farther pairs)",
      near > far,
      "near " + number(near) + " (" + std::to_string(near_n) + " pairs), far " + number(far) + " (" +
          std::to_string(far_n) + " pairs)");
}

}  // namespace mdl::demo
