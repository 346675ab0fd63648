// Experts added to and pruned from a ModuleFormer after training (Shen et al., 2023, §3.3 and §4.3):
//   add    every layer gets n new attention and/or MLP experts and its routers a row for each, drawn as at
//          initialisation; the config records how many experts were there before (`mdl_frozen_experts`),
//          so a run with options.freeze_old_experts trains only the new experts and their router rows
//          (continual learning on a new domain: the old experts and routing cannot forget)
//   prune  each layer keeps the experts its routers used most on some data (measured with the routing log,
//          after fine-tuning with the load-concentration loss if wanted); the routers keep exactly the rows
//          of the kept experts, in the same order, so what remains routes as before among them
// Both return a new model (the same device and dtype); the input is left as it was.
#pragma once

#include <cstdint>
#include <vector>

#include "mdl/backbones/model.h"

namespace mdl {

class RoutingLog;

/// Experts per layer of each mixture.
struct ExpertCounts {
  int64_t attention = 0;
  int64_t mlp = 0;
};

/// A copy of `model` with `add` more experts in every layer; new weights N(0, initializer_range) (gmm
/// centroids N(0, 1)) from `seed`.
Model add_experts(const ModelImpl& model, ExpertCounts add, uint64_t seed);

/// A copy of `model` whose layer l keeps attention experts `attention[l]` and MLP experts `mlp[l]` (each
/// layer the same number; empty lists keep every expert of that mixture). k shrinks to the experts kept
/// when it exceeds them.
Model keep_experts(const ModelImpl& model, const std::vector<std::vector<int64_t>>& attention,
                   const std::vector<std::vector<int64_t>>& mlp);

/// How much each layer's experts are used: [layer][expert], the share of the layer's assignments.
struct ExpertUsage {
  std::vector<std::vector<double>> attention, mlp;
};

/// Sums the routing logs of forwards over some data into each expert's share.
class ExpertUsageMeter {
 public:
  explicit ExpertUsageMeter(const ModelConfig& config);
  void add(const RoutingLog& log);
  ExpertUsage usage() const;

 private:
  std::vector<std::vector<double>> attention_, mlp_;  // assignments per layer and expert
};

/// Per layer, the `keep` most used experts (ascending expert index; ties to the lower index).
std::vector<std::vector<int64_t>> most_used(const std::vector<std::vector<double>>& usage, int64_t keep);

/// The experts a ModuleFormer had before `add_experts` (its config's mdl_frozen_experts), or {0, 0}.
ExpertCounts frozen_experts(const ModelConfig& config);

/// A parameter of which only the rows from `frozen` on (dimension 0: the experts) train.
struct ExpertSlice {
  at::Tensor param;
  int64_t frozen = 0;
};
/// The experts' weights and their routers' expert rows, with the rows of the old experts frozen; throws
/// unless the model is a ModuleFormer that has had experts added.
std::vector<ExpertSlice> new_expert_slices(ModelImpl& model);

}  // namespace mdl
