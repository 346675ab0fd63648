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
//   average:   SMEAR over trained LoRAs: a learned router scores each example (the mean of its tokens), and
//              the members' factors are averaged with its weights before one low-rank product
//              (out = h + s (x A_b^T) B_b^T, A_b = sum_n w_bn A_n); members must be plain LoRAs of one rank
// A fusion is a module group (module_group.h): its members are ordinary modules, the kinds differ in the
// group's router and aggregator. While a fusion is active its members are skipped at the sites it covers
// (it runs them itself); they still act alone elsewhere. Members keep their own parameters; the fusion
// owns only its router's or aggregator's.
#pragma once

#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "mdl/modules/module_group.h"
#include "mdl/routing/router.h"

namespace mdl {

template <class T>
class FieldList;

/// Fusion settings.
struct FusionOptions {
  std::vector<std::string> members;  ///< names of the fused modules (loaded before the fusion)
  std::string kind = "attention";    ///< attention | gate | mixture | average
  double temperature = 1.0;          ///< attention: softmax temperature (AdapterFusion anneals 50 -> 1)
  RouterOptions router;  ///< mixture: the routing policy (token or example level); average: example level
};
void to_json(nlohmann::json& j, const FusionOptions& o);
void from_json(const nlohmann::json& j, FusionOptions& o);
/// The fields of FusionOptions: JSON keys, defaults and meanings (core/fields.h).
const FieldList<FusionOptions>& fusion_fields();
/// Throws naming the field when a value is out of its range (its field list runs it after reading).
void validate(const FusionOptions& o);

/// One site's fusion: a group over its members. attention and gate: every member on every row, combined
/// by AttentionFusion or GateFusion; mixture: a LearnedRouter (parameter "router", (N, in)) over the
/// members and a WeightedSum; average: the same router at example level and a ParameterAverage.
class FusionImpl : public ModuleGroupImpl {
 public:
  FusionImpl(const SiteInfo& site, const FusionOptions& options,
             std::vector<std::shared_ptr<SiteModule>> members, uint64_t seed, c10::TensorOptions dtype);
  void set_temperature(double t);

  FusionOptions options;
  at::Tensor query, key, value;  // attention: (C, C) each
  at::Tensor gate_w, gate_b;     // gate: (N, C), (N)
  at::Tensor router_w;           // mixture: (N, in) router logits from the site's input

 private:
  struct Parts {
    std::shared_ptr<GroupRouter> router;
    std::shared_ptr<Aggregator> aggregator;
  };
  static Parts parts(const SiteInfo& site, const FusionOptions& options, int64_t members, uint64_t seed,
                     c10::TensorOptions dtype);
  FusionImpl(const SiteInfo& site, const FusionOptions& options,
             std::vector<std::shared_ptr<SiteModule>> members, Parts parts);
};
TORCH_MODULE(Fusion);

}  // namespace mdl
