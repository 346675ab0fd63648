#include "mdl/modules/lora_mixture.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/core/fields.h"

namespace mdl {

void to_json(nlohmann::json& j, const LoraMixtureOptions& o) {
  j = lora_moe_fields().write(o);
}

const FieldList<LoraMixtureOptions>& lora_moe_fields() {
  static const FieldList<LoraMixtureOptions> f =
      FieldList<LoraMixtureOptions>("lora_moe")
          .add("experts", &LoraMixtureOptions::experts, "LoRA experts per site")
          .add("r", &LoraMixtureOptions::r, "each expert's rank")
          .add("lora_alpha", &LoraMixtureOptions::alpha, "scaling alpha / r")
          .add("router", &LoraMixtureOptions::router, router_fields(), "the routing policy")
          .add("smear", &LoraMixtureOptions::smear,
               "average the experts' parameters per example (SMEAR; router level example or task)")
          .add("num_tasks", &LoraMixtureOptions::num_tasks,
               "task-level routing: learned per-task logits for this many tasks")
          .check([](const LoraMixtureOptions& o) { validate(o); });
  return f;
}

void validate(const LoraMixtureOptions& o) {
  MDL_CHECK(o.experts >= 1 && o.r >= 1, "[lora_moe] experts and r must be >= 1, got ", o.experts, " and ",
            o.r);
  MDL_CHECK(!o.smear || o.router.level != "token",
            "[lora_moe] smear averages parameters per example: set "
            "router.level to example or task, not token");
  MDL_CHECK(o.router.level != "task" || o.num_tasks > 0, "[lora_moe] task-level routing needs num_tasks > 0");
}

void from_json(const nlohmann::json& j, LoraMixtureOptions& o) {
  o = lora_moe_fields().read(j);
}

LoraMixtureImpl::Parts LoraMixtureImpl::parts(const SiteInfo& site, const LoraMixtureOptions& o,
                                              uint64_t seed, c10::TensorOptions dtype) {
  MDL_CHECK(site.kind == SiteKind::linear, "[lora_moe] '", site.name, "' is not a linear site");
  const int64_t E = o.experts, in = site.in_features, out = site.out_features;
  auto gen = at::detail::createCPUGenerator(seed);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));  // as LoRA's A
  Parts p;
  p.A = at::empty({E, o.r, in}).uniform_(-bound, bound, gen).to(dtype);
  p.B = at::zeros({E, out, o.r}).to(dtype);
  at::Tensor gate = at::empty({E, in}).normal_(0.0, 0.02, gen).to(dtype);
  at::Tensor task_logits = o.router.level == "task" ? at::zeros({o.num_tasks, E}).to(dtype) : at::Tensor();
  p.router = std::make_shared<LearnedRouter>(site.name, "lora_moe", o.router, gate, "router", task_logits);
  return p;
}

LoraMixtureImpl::LoraMixtureImpl(const SiteInfo& site, const LoraMixtureOptions& o, uint64_t seed,
                                 c10::TensorOptions dtype)
    : LoraMixtureImpl(site, o, parts(site, o, seed, dtype)) {}

LoraMixtureImpl::LoraMixtureImpl(const SiteInfo& site, const LoraMixtureOptions& o, Parts p)
    : ModuleGroupImpl("lora_moe", site, stacked_lora_members(p.A, p.B, o.alpha / static_cast<double>(o.r)),
                      {}, p.router,
                      o.smear ? std::shared_ptr<Aggregator>(std::make_shared<ParameterAverage>())
                              : std::make_shared<WeightedSum>()),
      options(o),
      scaling(o.alpha / static_cast<double>(o.r)),
      router_(p.router) {
  // The experts' factors are the group's parameters (the members read these tensors).
  A = register_parameter("lora_A", p.A);
  B = register_parameter("lora_B", p.B);
  gate = router_->gate();
  task_logits = router_->task_logits();
}

void LoraMixtureImpl::set_router(const RouterOptions& o) {
  MDL_CHECK(!options.smear || o.level != "token", "[lora_moe] smear needs an example- or task-level router");
  router_->set_options(o);  // refuses task level without per-task logits
  options.router = o;
}

}  // namespace mdl
