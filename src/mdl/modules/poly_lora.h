// Polytropon (Ponti et al., 2023) and multi-head routing, MHR (Caccia et al., 2023): an inventory of S
// skill LoRAs at each linear site and a task-by-skill allocation matrix of logits. In training the
// allocation is sampled with a relaxed Bernoulli (Gumbel-sigmoid), at evaluation it is sigmoid(logits);
// each row is normalised to sum to one, and the task's LoRA is the weighted average of the skills' A and B
// (parameter aggregation, then one low-rank product per example). MHR splits A's input dimension and B's
// output dimension into h heads, each with its own allocation (h = 1 is Polytropon). Task ids come from
// the forward's routing context.
#pragma once

#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "mdl/modules/module_group.h"

namespace mdl {

template <class T>
class FieldList;

/// Polytropon / MHR settings.
struct PolyLoraOptions {
  int64_t num_tasks = 1;
  int64_t num_skills = 4;
  int64_t r = 4;             ///< rank of every skill
  double alpha = 8;          ///< scaling alpha / r
  int64_t heads = 1;         ///< MHR heads (1 = Polytropon)
  double temperature = 1.0;  ///< Gumbel-sigmoid relaxation temperature (training)
  /// one allocation matrix for all sites (default: one per site, as Polytropon)
  bool shared_allocation = false;
};
void to_json(nlohmann::json& j, const PolyLoraOptions& o);
void from_json(const nlohmann::json& j, PolyLoraOptions& o);
/// The fields of PolyLoraOptions: JSON keys, defaults and meanings (core/fields.h).
const FieldList<PolyLoraOptions>& poly_lora_fields();
/// Throws naming the field when a value is out of its range (its field list runs it after reading).
void validate(const PolyLoraOptions& o);

/// The allocation's settings in these options.
SkillAllocationOptions allocation_options(const PolyLoraOptions& options);

/// One site's skill inventory: a group whose members are its S stacked skill LoRAs, behind a
/// SkillAllocationRouter, combined by a ParameterAverage (per head for MHR).
class PolyLoraImpl : public ModuleGroupImpl {
 public:
  /// `owner`: this part registers `allocation` as its parameter (the first site, or every site when not
  /// shared).
  PolyLoraImpl(const SiteInfo& site, const PolyLoraOptions& options,
               std::shared_ptr<SkillAllocationImpl> allocation, bool owner, uint64_t seed,
               c10::TensorOptions dtype);
  /// The task's averaged factors for skill weights (B, heads, S): A (B, r, in), B (B, out, r).
  std::pair<at::Tensor, at::Tensor> task_factors(const at::Tensor& weights) const;
  const std::shared_ptr<SkillAllocationImpl>& allocation() const { return allocation_; }

  PolyLoraOptions options;
  double scaling;
  at::Tensor A;  // (S, r, in)
  at::Tensor B;  // (S, out, r)

 private:
  struct Parts {
    at::Tensor A, B;
  };
  static Parts parts(const SiteInfo& site, const PolyLoraOptions& options, uint64_t seed,
                     c10::TensorOptions dtype);
  PolyLoraImpl(const SiteInfo& site, const PolyLoraOptions& options,
               std::shared_ptr<SkillAllocationImpl> allocation, bool owner, Parts parts);
  std::shared_ptr<SkillAllocationImpl> allocation_;
};
TORCH_MODULE(PolyLora);

}  // namespace mdl
