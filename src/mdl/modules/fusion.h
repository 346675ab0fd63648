// Fusion: a module that aggregates other modules' outputs at each site they share (the survey's
// representation aggregation by attention or gating). Every member computes its change from the same
// input (in parallel, not stacked), and the fusion combines the changes:
//   attention (AdapterFusion, Pfeiffer et al., 2021): q = Wq h, k_n = Wk o_n, v_n = Wv o_n,
//              a = softmax_n(q . k_n / temperature), out = h + sum_n a_n v_n
//              (h the site's current output, o_n member n's change; Wv starts as the identity)
//   gate:      a learned gate per member, g_n = sigmoid(w_n . h + b_n), out = h + sum_n g_n o_n
//              (w = 0, b = 0 at the start: every member at half strength)
//   mixture:   the members are experts behind a learned router (any RouterOptions: top-k, Switch,
//              softmax...) scoring the site's input; each token's selected experts run on its rows only
//              (grouped dispatch), out = h + sum over its experts of weight * o_n. Experts of any module
//              type: adapters, LoRAs, (IA)^3...
// While a fusion is active its members are skipped at the sites it covers (it runs them itself); they
// still act alone elsewhere. Members keep their own parameters; the fusion owns only its own.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <memory>
#include <string>
#include <vector>

#include "mdl/modules/site_module.h"
#include "mdl/routing/router.h"

namespace mdl {

/// Fusion settings.
struct FusionOptions {
  std::vector<std::string> members;  ///< names of the fused modules (loaded before the fusion)
  std::string kind = "attention";    ///< attention | gate | mixture
  double temperature = 1.0;          ///< attention: softmax temperature (AdapterFusion anneals 50 -> 1)
  RouterOptions router;              ///< mixture: the routing policy (token or example level)
};
void to_json(nlohmann::json& j, const FusionOptions& o);
void from_json(const nlohmann::json& j, FusionOptions& o);

/// One site's fusion of its members' parts.
class FusionImpl : public SiteModule {
 public:
  FusionImpl(const SiteInfo& site, const FusionOptions& options, std::vector<std::shared_ptr<SiteModule>> members,
             uint64_t seed, c10::TensorOptions dtype);
  at::Tensor forward(const at::Tensor& input, const at::Tensor& current) override;
  std::string type() const override { return "fusion"; }
  const std::vector<const SiteModule*>& absorbs() const override { return absorbed_; }
  /// The members' weights (B, T, N) of the last forward: attention probabilities or gate values.
  const at::Tensor& last_weights() const { return last_weights_; }
  void set_temperature(double t) { options.temperature = t; }

  FusionOptions options;
  at::Tensor query, key, value;  // attention: (C, C) each
  at::Tensor gate_w, gate_b;     // gate: (N, C), (N)
  at::Tensor router_w;           // mixture: (N, in) router logits from the site's input

 private:
  SiteInfo site_;
  std::vector<std::shared_ptr<SiteModule>> members_;
  std::vector<const SiteModule*> absorbed_;
  std::shared_ptr<Router> router_;
  at::Tensor forward_mixture(const at::Tensor& input, const at::Tensor& current);
  at::Tensor last_weights_;
};
TORCH_MODULE(Fusion);

}  // namespace mdl
