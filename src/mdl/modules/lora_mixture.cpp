#include "mdl/modules/lora_mixture.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/routing/mixture.h"

namespace mdl {

void to_json(nlohmann::json& j, const LoraMixtureOptions& o) {
  j = {{"experts", o.experts}, {"r", o.r}, {"lora_alpha", o.alpha}, {"router", o.router}, {"smear", o.smear},
       {"num_tasks", o.num_tasks}};
}

void from_json(const nlohmann::json& j, LoraMixtureOptions& o) {
  o = LoraMixtureOptions();
  o.experts = j.value("experts", o.experts);
  o.r = j.value("r", o.r);
  o.alpha = j.value("lora_alpha", o.alpha);
  if (j.contains("router")) o.router = j["router"].get<RouterOptions>();
  o.smear = j.value("smear", o.smear);
  o.num_tasks = j.value("num_tasks", o.num_tasks);
  MDL_CHECK(o.experts >= 1 && o.r >= 1, "[lora_moe] experts and r must be >= 1, got ", o.experts, " and ", o.r);
  MDL_CHECK(!o.smear || o.router.level != "token", "[lora_moe] smear averages parameters per example: set "
            "router.level to example or task, not token");
  MDL_CHECK(o.router.level != "task" || o.num_tasks > 0, "[lora_moe] task-level routing needs num_tasks > 0");
}

LoraMixtureImpl::LoraMixtureImpl(const SiteInfo& site, const LoraMixtureOptions& o, uint64_t seed,
                                 c10::TensorOptions dtype)
    : options(o), scaling(o.alpha / static_cast<double>(o.r)), site_(site) {
  MDL_CHECK(site.kind == SiteKind::linear, "[lora_moe] '", site.name, "' is not a linear site");
  const int64_t E = o.experts, in = site.in_features, out = site.out_features;
  auto gen = at::detail::createCPUGenerator(seed);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));  // as LoRA's A
  A = register_parameter("lora_A", at::empty({E, o.r, in}).uniform_(-bound, bound, gen).to(dtype));
  B = register_parameter("lora_B", at::zeros({E, out, o.r}).to(dtype));
  gate = register_parameter("router", at::empty({E, in}).normal_(0.0, 0.02, gen).to(dtype));
  if (o.router.level == "task")
    task_logits = register_parameter("task_logits", at::zeros({o.num_tasks, E}).to(dtype));
  set_router(o.router);
}

void LoraMixtureImpl::set_router(const RouterOptions& o) {
  MDL_CHECK(!options.smear || o.level != "token", "[lora_moe] smear needs an example- or task-level router");
  MDL_CHECK(o.level != "task" || task_logits.defined(), "[lora_moe] '", site_.name,
            "' was created without per-task logits; create it with num_tasks > 0 for task-level routing");
  router_ = make_router(o);
  options.router = o;
}

at::Tensor LoraMixtureImpl::forward(const at::Tensor& input, const at::Tensor& current) {
  MDL_CHECK(input.dim() == 3, "[lora_moe] '", site_.name, "' expects (B, T, in) inputs, got ", input.sizes());
  const int64_t Bn = input.size(0), T = input.size(1), in = input.size(2), E = options.experts;
  const at::Tensor x = input.to(A.scalar_type());
  Routing r = route_tokens(*router_, site_.name, "lora_moe", x, E,
                           [&](const at::Tensor& rows) { return at::matmul(rows, gate.t()); }, task_logits, is_training());
  if (options.smear) {
    // One decision per example: average the experts' factors with its weights, then one product.
    at::Tensor w = r.dense_weights().view({Bn, T, E}).select(1, 0).to(A.scalar_type());  // (B, E)
    at::Tensor a = at::einsum("be,eri->bri", {w, A});                                  // (B, r, in)
    at::Tensor b = at::einsum("be,eor->bor", {w, B});                                  // (B, out, r)
    at::Tensor y = at::bmm(at::bmm(x, a.transpose(1, 2)), b.transpose(1, 2)) * scaling;  // (B, T, out)
    return current + y.to(current.scalar_type());
  }
  const int64_t out = B.size(1);
  at::Tensor y = dispatch(x.reshape({Bn * T, in}), r, out, [&](int64_t e, const at::Tensor& rows) {
    return at::matmul(at::matmul(rows, A[e].t()), B[e].t()) * scaling;
  });
  return current + y.view({Bn, T, out}).to(current.scalar_type());
}

}  // namespace mdl
