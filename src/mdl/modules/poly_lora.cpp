#include "mdl/modules/poly_lora.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/core/fields.h"

namespace mdl {

void to_json(nlohmann::json& j, const PolyLoraOptions& o) {
  j = poly_lora_fields().write(o);
}

const FieldList<PolyLoraOptions>& poly_lora_fields() {
  static const FieldList<PolyLoraOptions> f =
      FieldList<PolyLoraOptions>("poly_lora")
          .add("num_tasks", &PolyLoraOptions::num_tasks, "rows of the task-by-skill allocation")
          .add("num_skills", &PolyLoraOptions::num_skills, "skill LoRAs per site")
          .add("r", &PolyLoraOptions::r, "rank of every skill")
          .add("lora_alpha", &PolyLoraOptions::alpha, "scaling alpha / r")
          .add("heads", &PolyLoraOptions::heads, "multi-head routing (MHR) heads; 1 is Polytropon")
          .add("temperature", &PolyLoraOptions::temperature,
               "relaxed-Bernoulli temperature of the allocation in training")
          .add("shared_allocation", &PolyLoraOptions::shared_allocation,
               "one allocation for all sites (default: one per site, as Polytropon)")
          .check([](const PolyLoraOptions& o) { validate(o); });
  return f;
}

void validate(const PolyLoraOptions& o) {
  MDL_CHECK(o.num_tasks >= 1 && o.num_skills >= 1 && o.r >= 1 && o.heads >= 1,
            "[poly_lora] num_tasks, num_skills, r "
            "and heads must be >= 1, got ",
            o.num_tasks, ", ", o.num_skills, ", ", o.r, ", ", o.heads);
  MDL_CHECK(o.temperature > 0, "[poly_lora] temperature must be > 0, got ", o.temperature);
}

void from_json(const nlohmann::json& j, PolyLoraOptions& o) {
  o = poly_lora_fields().read(j);
}

SkillAllocationOptions allocation_options(const PolyLoraOptions& o) {
  SkillAllocationOptions a;
  a.num_tasks = o.num_tasks;
  a.num_skills = o.num_skills;
  a.heads = o.heads;
  a.temperature = o.temperature;
  return a;
}

PolyLoraImpl::Parts PolyLoraImpl::parts(const SiteInfo& site, const PolyLoraOptions& o, uint64_t seed,
                                        c10::TensorOptions dtype) {
  MDL_CHECK(site.kind == SiteKind::linear, "[poly_lora] '", site.name, "' is not a linear site");
  const int64_t S = o.num_skills, in = site.in_features, out = site.out_features;
  MDL_CHECK(in % o.heads == 0 && out % o.heads == 0, "[poly_lora] '", site.name, "': ", o.heads,
            " heads must divide ", "the input (", in, ") and output (", out, ") widths");
  auto gen = at::detail::createCPUGenerator(seed);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  return {at::empty({S, o.r, in}).uniform_(-bound, bound, gen).to(dtype), at::zeros({S, out, o.r}).to(dtype)};
}

PolyLoraImpl::PolyLoraImpl(const SiteInfo& site, const PolyLoraOptions& o,
                           std::shared_ptr<SkillAllocationImpl> allocation, bool owner, uint64_t seed,
                           c10::TensorOptions dtype)
    : PolyLoraImpl(site, o, std::move(allocation), owner, parts(site, o, seed, dtype)) {}

PolyLoraImpl::PolyLoraImpl(const SiteInfo& site, const PolyLoraOptions& o,
                           std::shared_ptr<SkillAllocationImpl> allocation, bool owner, Parts p)
    : ModuleGroupImpl("poly_lora", site, stacked_lora_members(p.A, p.B, o.alpha / static_cast<double>(o.r)),
                      {}, std::make_shared<SkillAllocationRouter>(site.name, allocation, owner),
                      std::make_shared<ParameterAverage>(o.heads)),
      options(o),
      scaling(o.alpha / static_cast<double>(o.r)),
      allocation_(std::move(allocation)) {
  // The skills' factors are the group's parameters (the members read these tensors).
  A = register_parameter("lora_A", p.A);
  B = register_parameter("lora_B", p.B);
}

std::pair<at::Tensor, at::Tensor> PolyLoraImpl::task_factors(const at::Tensor& w) const {
  return ParameterAverage(options.heads).average(A, B, w);
}

}  // namespace mdl
