// What a training run logs: one record per step in <out_dir>/metrics.jsonl (loss, learning rate,
// evaluations, routing statistics), read back for resuming and plotted as loss.svg and eval.svg.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace mdl {

/// One logged point.
struct TrainMetrics {
  int64_t step = 0;
  double loss = 0;  ///< training loss of the step (task loss + weighted aux loss)
  double lr = 0;
  double eval = -1;  ///< accuracy (classification, tagging) or perplexity (LM); -1 when not evaluated
  double f1 = -1;    ///< macro-F1 over the labels (classification, tagging); -1 when not evaluated
  std::map<std::string, double> eval_tasks;  ///< `eval` per task, when the evaluation data has several
  /// Routing statistics of the step's last micro-batch, when the model routes: aux_loss, entropy (mean
  /// over routed sites), dropped_fraction (mean), max_load (the largest expert share at any site).
  std::map<std::string, double> routing;
};

/// One metrics.jsonl line for `m`.
std::string metrics_line(const TrainMetrics& m);
/// Reads a metrics.jsonl written by Trainer::train (errors name the file and line).
std::vector<TrainMetrics> read_metrics(const std::string& path);
/// Draws <dir>/loss.svg (training loss by step) and, when evaluations exist, <dir>/eval.svg.
void write_training_plots(const std::string& dir, const std::vector<TrainMetrics>& metrics,
                          bool eval_is_perplexity);

}  // namespace mdl
