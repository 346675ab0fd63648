// Evaluation of a model with its attached modules on a dataset, batched as training batches it (padding,
// images, task and language ids, fixed routing), without gradients, in evaluation mode: accuracy and
// macro-F1 for classification heads, perplexity for causal LM heads; per task; raw logits.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <string>
#include <vector>

#include "mdl/backbones/moduleformer_experts.h"
#include "mdl/training/batch.h"
#include "mdl/training/dataset.h"

namespace mdl {

class ModelImpl;

/// What an evaluation measures; NaN where it does not apply to the head.
struct EvalMetrics {
  /// classification: examples; tagging: labelled tokens
  double accuracy = std::numeric_limits<double>::quiet_NaN();
  /// F1 per label (seen in truth or prediction), averaged
  double macro_f1 = std::numeric_limits<double>::quiet_NaN();
  /// causal LM: exp(mean NLL) over target tokens
  double perplexity = std::numeric_limits<double>::quiet_NaN();
  /// Accuracy for classification heads, perplexity for LM heads.
  double primary() const { return std::isnan(perplexity) ? accuracy : perplexity; }
};

/// Accuracy (sequence or token classification heads) or perplexity (causal LM head) of `model` with its
/// attached modules on `data`, in batches, without gradients; examples carry their task and language ids
/// and use the modules `routing` gives them.
EvalMetrics evaluate_metrics(ModelImpl& model, const Dataset& data, int64_t batch_size = 16,
                             const ExampleRouting& routing = {});
/// The head's outputs for every example of `data`, in order, batched as training batches them (padding,
/// images, task and language ids, `routing`), without gradients, in evaluation mode: (N, L) float32 on the
/// CPU for sequence classification heads.
at::Tensor predict_logits(ModelImpl& model, const Dataset& data, int64_t batch_size = 64,
                          const ExampleRouting& routing = {});
/// evaluate_metrics(...).primary().
double evaluate(ModelImpl& model, const Dataset& data, int64_t batch_size = 16,
                const ExampleRouting& routing = {});
/// Macro-F1 of predicted vs target class ids (N) over `num_classes` classes.
double macro_f1(const at::Tensor& predicted, const at::Tensor& target, int64_t num_classes);
/// evaluate() per task of a multi-task dataset (task -> metric).
std::map<std::string, double> evaluate_per_task(ModelImpl& model, const Dataset& data,
                                                int64_t batch_size = 16, const ExampleRouting& routing = {});

/// Each ModuleFormer expert's share of its layer's assignments over `data`'s tokens (what `mdl experts prune`
/// keeps by), in evaluation mode, one example per forward so that no padding is routed.
ExpertUsage measure_expert_usage(ModelImpl& model, const Dataset& data);

/// Every routed site's routing over `data`, each row labelled by its example's `label` ("task",
/// "language" or "label"): what routing/specialisation measures (do the experts specialise by task?).
struct LabelledRouting {
  std::vector<std::string> values;  ///< the label values, in order of first appearance (rule r = values[r])
  std::vector<std::string> sites;   ///< routed sites, in forward order
  std::map<std::string, at::Tensor> probs;  ///< site -> (rows, E) routing probabilities
  std::map<std::string, at::Tensor> rules;  ///< site -> (rows) int64 label index of each row
};
/// Runs `model` (with its attached modules) over at most `max_examples` examples of `data`, one per forward
/// so every routed row belongs to one example, keeping each site's per-row routing probabilities. Throws
/// when no site routes anything or an example lacks the label.
LabelledRouting routing_by_label(ModelImpl& model, const Dataset& data, const std::string& label,
                                 int64_t max_examples = 1000);

}  // namespace mdl
