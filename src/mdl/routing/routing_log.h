// Auxiliary routing losses and diagnostics, as pure functions of a routing, and the log that collects
// them per site during a forward pass (set ModelInput::routing_log). The trainer adds the log's
// `aux_loss()` to its objective; `to_string()` prints a per-layer table.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <vector>

#include "mdl/routing/router.h"

namespace mdl {

/// Switch Transformer load-balancing loss: E * sum_e f_e * P_e, with f_e the fraction of rows that chose
/// expert e (among their k, before capacity dropping; as Hugging Face's Mixtral) and P_e the mean router
/// probability of e. 1 when perfectly balanced. Differentiable through P.
at::Tensor load_balancing_loss(const at::Tensor& probs, const at::Tensor& chosen);
/// Router z-loss (ST-MoE): mean over rows of logsumexp(logits)^2.
at::Tensor router_z_loss(const at::Tensor& logits);
/// ModuleFormer's mutual-information loss over router probabilities (N, E): H(e|x) - H(e), the rows' mean
/// entropy less the entropy of the experts' mean use p(e) = mean_x p(e|x). Minimised, each row's routing
/// sharpens while the experts' use evens out: 0 for a uniform router, -log E for a balanced one-hot one.
/// Differentiable.
at::Tensor mutual_information_loss(const at::Tensor& probs);
/// H(e), the entropy of the experts' mean use (nats): ModuleFormer's load concentration, minimised before
/// pruning so that few experts carry the data. Differentiable.
at::Tensor usage_entropy(const at::Tensor& probs);
/// Mean entropy (nats) of the rows' router distributions.
double routing_entropy(const at::Tensor& probs);
/// Share of the kept assignments' rows that each expert received (sums to 1).
std::vector<double> expert_load(const Routing& r);

/// One routed site's record of one forward.
struct RoutingStats {
  std::string site;
  int64_t rows = 0;
  std::vector<double> load;     ///< per expert, after dropping
  double entropy = 0;           ///< nats; 0 without logits
  double dropped_fraction = 0;  ///< dropped / requested assignments (expert choice: rows no expert took)
  double load_balancing = 0;    ///< the loss's value (0 without logits)
  double z_loss = 0;
  double usage_entropy = 0;  ///< H(e) of the experts' mean use (nats); 0 without logits
  /// (rows, E) each row's routing probabilities (the softmax where there are logits, else the routing's
  /// weights), kept only when the log keeps them (keep_weights)
  at::Tensor weights;
};

/// What routers record during one forward.
class RoutingLog {
 public:
  /// Records `r` for `site`, adding its losses with the options' coefficients to the aux loss (load
  /// balancing, z-loss, mutual information, usage entropy).
  void record(const std::string& site, const Routing& r, const RouterOptions& options);
  const std::vector<RoutingStats>& stats() const { return stats_; }
  /// The weighted sum of the recorded auxiliary losses (differentiable); a zero scalar when none.
  at::Tensor aux_loss() const;
  /// A decision shared by all layers (RouterOptions::shared): stored by the first layer under `key`.
  const Routing* shared(const std::string& key) const;
  void set_shared(const std::string& key, const Routing& r) { shared_[key] = r; }
  void clear();
  /// Keep every record's per-row routing probabilities (RoutingStats::weights; off by default).
  void keep_weights(bool on) { keep_weights_ = on; }
  /// A table: site, rows, per-expert load, entropy, dropped fraction, losses.
  std::string to_string() const;

 private:
  std::vector<RoutingStats> stats_;
  at::Tensor aux_;
  std::map<std::string, Routing> shared_;
  bool keep_weights_ = false;
};

}  // namespace mdl
