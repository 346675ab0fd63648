// A mixture of LoRA experts at a linear site (MoLoRA / X-LoRA-like, and SMEAR): E LoRA experts, a learned
// gate scoring each token or example, and any router. The experts' contributions are dispatched per
// expert and summed with the routing weights (representation aggregation). With `smear` the router's
// per-example probabilities average the experts' A and B instead, then one low-rank product runs per
// example (SMEAR, Muqeeth et al., 2023: parameter aggregation, one forward pass).
#pragma once

#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "mdl/modules/module_group.h"
#include "mdl/routing/router.h"

namespace mdl {

template <class T>
class FieldList;

/// Mixture-of-LoRAs settings.
struct LoraMixtureOptions {
  int64_t experts = 4;    ///< LoRA experts per site
  int64_t r = 8;          ///< each expert's rank
  double alpha = 8;       ///< scaling alpha / r
  RouterOptions router;   ///< default top-2 of the experts, token level
  bool smear = false;     ///< average the experts' parameters per example (router level example or task)
  int64_t num_tasks = 0;  ///< task-level routing: learned per-task logits
};
void to_json(nlohmann::json& j, const LoraMixtureOptions& o);
void from_json(const nlohmann::json& j, LoraMixtureOptions& o);
/// The fields of LoraMixtureOptions: JSON keys, defaults and meanings (core/fields.h).
const FieldList<LoraMixtureOptions>& lora_moe_fields();
/// Throws naming the field when a value is out of its range (its field list runs it after reading).
void validate(const LoraMixtureOptions& o);

/// One site's mixture of LoRAs: a group whose members are its E stacked LoRA experts, behind a
/// LearnedRouter (parameters "router" (E, in) and, at task level, "task_logits" (tasks, E)), combined by a
/// WeightedSum, or with `smear` by a ParameterAverage.
class LoraMixtureImpl : public ModuleGroupImpl {
 public:
  LoraMixtureImpl(const SiteInfo& site, const LoraMixtureOptions& options, uint64_t seed,
                  c10::TensorOptions dtype);
  /// Replaces the routing policy (the gate's parameters stay).
  void set_router(const RouterOptions& options);

  LoraMixtureOptions options;
  double scaling;
  at::Tensor A;            // (E, r, in)
  at::Tensor B;            // (E, out, r)
  at::Tensor gate;         // (E, in) router weights for token/example level
  at::Tensor task_logits;  // (num_tasks, E) for task level, else undefined

 private:
  struct Parts {
    at::Tensor A, B;
    std::shared_ptr<LearnedRouter> router;
  };
  static Parts parts(const SiteInfo& site, const LoraMixtureOptions& options, uint64_t seed,
                     c10::TensorOptions dtype);
  LoraMixtureImpl(const SiteInfo& site, const LoraMixtureOptions& options, Parts parts);
  std::shared_ptr<LearnedRouter> router_;
};
TORCH_MODULE(LoraMixture);

}  // namespace mdl
