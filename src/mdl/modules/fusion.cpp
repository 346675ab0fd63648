#include "mdl/modules/fusion.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/core/fields.h"

namespace mdl {

void to_json(nlohmann::json& j, const FusionOptions& o) {
  j = fusion_fields().write(o);
}

const FieldList<FusionOptions>& fusion_fields() {
  static const FieldList<FusionOptions> f =
      FieldList<FusionOptions>("fusion")
          .add("members", &FusionOptions::members, "names of the fused modules, loaded before the fusion")
          .add("kind", &FusionOptions::kind, "attention | gate | mixture | average")
          .add("temperature", &FusionOptions::temperature,
               "attention: softmax temperature (AdapterFusion anneals 50 -> 1)")
          .add("router", &FusionOptions::router, router_fields(), "mixture and average: the routing policy")
          .check([](const FusionOptions& o) { validate(o); });
  return f;
}

void validate(const FusionOptions& o) {
  MDL_CHECK(o.members.size() >= 2, "[fusion] fuses at least 2 modules, got ", o.members.size());
  MDL_CHECK(o.kind == "attention" || o.kind == "gate" || o.kind == "mixture" || o.kind == "average",
            "[fusion] kind '", o.kind, "' is unknown; expected attention, gate, mixture or average");
  MDL_CHECK(o.kind != "average" || o.router.level == "example",
            "[fusion] an average mixes parameters once per example: "
            "set router.level to example, not ",
            o.router.level);
  MDL_CHECK(o.kind != "mixture" || o.router.level != "task",
            "[fusion] a mixture's router scores the site's input: "
            "level token or example (task-level mixtures: poly_lora or lora_moe with num_tasks)");
  MDL_CHECK(o.temperature > 0, "[fusion] temperature must be > 0, got ", o.temperature);
}

void from_json(const nlohmann::json& j, FusionOptions& o) {
  o = fusion_fields().read(j);
}

FusionImpl::Parts FusionImpl::parts(const SiteInfo& site, const FusionOptions& o, int64_t N, uint64_t seed,
                                    c10::TensorOptions dtype) {
  auto gen = at::detail::createCPUGenerator(seed);
  Parts p;
  if (o.kind == "attention") {  // as AdapterFusion: small random query and key, identity value
    p.aggregator = std::make_shared<AttentionFusion>(site.out_features, o.temperature, gen, dtype);
  } else if (o.kind == "gate") {
    p.aggregator = std::make_shared<GateFusion>(N, site.out_features, dtype);
  } else {  // mixture, average: a learned router over the members
    at::Tensor gate = at::empty({N, site.in_features}).normal_(0.0, 0.02, gen).to(dtype);
    p.router = std::make_shared<LearnedRouter>(site.name, "fusion", o.router, gate, "router");
    if (o.kind == "mixture")
      p.aggregator = std::make_shared<WeightedSum>();
    else
      p.aggregator = std::make_shared<ParameterAverage>();
  }
  p.aggregator->keep_weights(true);
  return p;
}

namespace {
std::vector<const SiteModule*> raw(const std::vector<std::shared_ptr<SiteModule>>& members) {
  std::vector<const SiteModule*> out;
  for (const auto& m : members) out.push_back(m.get());
  return out;
}
}  // namespace

FusionImpl::FusionImpl(const SiteInfo& site, const FusionOptions& o,
                       std::vector<std::shared_ptr<SiteModule>> members, uint64_t seed,
                       c10::TensorOptions dtype)
    : FusionImpl(site, o, members, parts(site, o, static_cast<int64_t>(members.size()), seed, dtype)) {}

FusionImpl::FusionImpl(const SiteInfo& site, const FusionOptions& o,
                       std::vector<std::shared_ptr<SiteModule>> members, Parts p)
    : ModuleGroupImpl("fusion", site, module_members(members, site.out_features, site.name), raw(members),
                      p.router, p.aggregator),
      options(o) {
  if (auto* a = dynamic_cast<AttentionFusion*>(p.aggregator.get()))
    query = a->query, key = a->key, value = a->value;
  if (auto* g = dynamic_cast<GateFusion*>(p.aggregator.get())) gate_w = g->weight, gate_b = g->bias;
  if (auto* r = dynamic_cast<LearnedRouter*>(p.router.get())) router_w = r->gate();
  if (o.kind == "average") {
    at::Tensor A, B;
    double scaling = 0;
    for (size_t n = 0; n < members.size(); ++n)
      MDL_CHECK(members[n]->low_rank(A, B, scaling), "[fusion] '", site.name,
                "': an average mixes its members' LoRA ", "factors, but member '", o.members[n], "' is a ",
                members[n]->type(),
                " module; average plain LoRAs, or "
                "combine other modules with kind mixture, attention or gate");
    MDL_CHECK(this->members().stacked_low_rank(A, B, scaling), "[fusion] '", site.name,
              "': an average needs LoRAs of one "
              "rank and scaling; the members' differ");
  }
}

void FusionImpl::set_temperature(double t) {
  options.temperature = t;
  if (auto* a = dynamic_cast<AttentionFusion*>(&aggregator())) a->temperature = t;
}

}  // namespace mdl
