#include "mdl/training/metrics.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/json_file.h"
#include "mdl/report/plot.h"

namespace mdl {
namespace fs = std::filesystem;

std::string metrics_line(const TrainMetrics& m) {
  nlohmann::json j = {{"step", m.step}, {"loss", m.loss}, {"lr", m.lr}};
  if (m.eval >= 0) j["eval"] = m.eval;
  if (m.f1 >= 0) j["f1"] = m.f1;
  if (!m.eval_tasks.empty()) j["eval_tasks"] = m.eval_tasks;
  if (!m.routing.empty()) j["routing"] = m.routing;
  return j.dump() + "\n";
}

std::vector<TrainMetrics> read_metrics(const std::string& path) {
  std::vector<TrainMetrics> out;
  const std::string text = io::read_text(path);
  size_t start = 0, line = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    ++line;
    if (end > start) {
      const auto j = nlohmann::json::parse(text.begin() + static_cast<std::ptrdiff_t>(start),
                                           text.begin() + static_cast<std::ptrdiff_t>(end), nullptr, false);
      MDL_CHECK(j.is_object() && j.contains("step") && j.contains("loss"), "[train] '", path, "' line ", line,
                ": expected a metrics record {\"step\", \"loss\", ...}");
      TrainMetrics m;
      m.step = j["step"].get<int64_t>();
      m.loss = j["loss"].get<double>();
      m.lr = j.value("lr", 0.0);
      m.eval = j.value("eval", -1.0);
      m.f1 = j.value("f1", -1.0);
      if (j.contains("eval_tasks")) m.eval_tasks = j["eval_tasks"].get<std::map<std::string, double>>();
      if (j.contains("routing")) m.routing = j["routing"].get<std::map<std::string, double>>();
      out.push_back(m);
    }
    start = end + 1;
  }
  return out;
}

void write_training_plots(const std::string& dir, const std::vector<TrainMetrics>& metrics,
                          bool eval_is_perplexity) {
  Series loss{"training loss", {}, {}}, eval{eval_is_perplexity ? "perplexity" : "accuracy", {}, {}};
  for (const auto& m : metrics) {
    loss.x.push_back(static_cast<double>(m.step)), loss.y.push_back(m.loss);
    if (m.eval >= 0) eval.x.push_back(static_cast<double>(m.step)), eval.y.push_back(m.eval);
  }
  if (loss.x.empty()) return;
  PlotOptions o;
  o.title = "Training loss", o.x_label = "step", o.y_label = "loss";
  write_line_plot((fs::path(dir) / "loss.svg").string(), {loss}, o);
  if (eval.x.empty()) return;
  o.title = eval_is_perplexity ? "Evaluation perplexity" : "Evaluation accuracy";
  o.y_label = eval.name;
  o.log_y = eval_is_perplexity;
  write_line_plot((fs::path(dir) / "eval.svg").string(), {eval}, o);
}

}  // namespace mdl
