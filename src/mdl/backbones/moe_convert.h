// Dense -> mixture-of-experts conversions of Llama-family models into the Mixtral layout, so the result
// loads, saves, routes and trains like any Mixtral checkpoint:
// - sparse upcycling (Komatsuzaki et al., 2023): every expert starts as a copy of the dense MLP and a new
//   router is initialised; with identical experts the model equals the dense one under any router whose
//   weights sum to one.
// - MoEfication (Zhang et al., 2022): the dense MLP's intermediate neurons are split into E equal groups
//   by balanced k-means over their gate weights or their co-activations on sample text; each group is an
//   expert, the router scores a group by the mean of its gate rows, and the top-k groups' outputs are
//   summed (unit weights). With k = E it equals the dense model; the report says how much of the dense
//   MLP output a top-k selection keeps.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "mdl/backbones/model.h"

namespace mdl {

/// Sparse upcycling settings.
struct UpcycleOptions {
  int64_t experts = 8;
  int64_t top_k = 2;
  double noise = 0.0;       ///< relative Gaussian noise added to each copy (0: identical experts)
  uint64_t seed = 0;        ///< router initialisation and noise
  std::string router_json;  ///< RouterOptions as JSON replacing the top-k default (stored in config.json)
};

/// A Mixtral-layout copy of a dense Llama-family `model` with upcycled experts; for a ViT, the same ViT
/// with each MLP a mixture of copies (`vit.encoder.layer.N.moe.experts.E...`, `num_local_experts`).
Model upcycle(const ModelImpl& model, const UpcycleOptions& options);

/// MoEfication settings.
struct MoefyOptions {
  int64_t experts = 8;
  int64_t top_k = 2;
  std::string method = "weights";  ///< weights | activations (co-activation patterns on `sample_ids`)
  int64_t iterations = 20;         ///< k-means iterations
  uint64_t seed = 0;
};

/// What a top-k selection of the groups keeps of each layer's dense MLP output on the sample:
/// 1 - ||y_dense - y_topk||^2 / ||y_dense||^2.
struct MoefyReport {
  std::vector<double> kept;  ///< per layer
  double mean_kept() const;
};

/// A Mixtral-layout model whose experts partition `model`'s MLP neurons. `sample_ids` (B, T) feeds the
/// co-activation clustering and the report (required for method activations; optional otherwise); the
/// sample pass borrows `model`'s MLP sites and restores what was attached there.
Model moefy(ModelImpl& model, const MoefyOptions& options, const at::Tensor& sample_ids, MoefyReport* report);

}  // namespace mdl
