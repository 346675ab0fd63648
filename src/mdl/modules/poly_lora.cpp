#include "mdl/modules/poly_lora.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/core/forward_context.h"
#include "mdl/routing/routing_context.h"
#include "mdl/routing/routing_log.h"

namespace mdl {

void to_json(nlohmann::json& j, const PolyLoraOptions& o) {
  j = {{"num_tasks", o.num_tasks}, {"num_skills", o.num_skills}, {"r", o.r}, {"lora_alpha", o.alpha},
       {"heads", o.heads}, {"temperature", o.temperature}, {"shared_allocation", o.shared_allocation}};
}

void from_json(const nlohmann::json& j, PolyLoraOptions& o) {
  o = PolyLoraOptions();
  o.num_tasks = j.value("num_tasks", o.num_tasks);
  o.num_skills = j.value("num_skills", o.num_skills);
  o.r = j.value("r", o.r);
  o.alpha = j.value("lora_alpha", o.alpha);
  o.heads = j.value("heads", o.heads);
  o.temperature = j.value("temperature", o.temperature);
  o.shared_allocation = j.value("shared_allocation", o.shared_allocation);
  MDL_CHECK(o.num_tasks >= 1 && o.num_skills >= 1 && o.r >= 1 && o.heads >= 1, "[poly_lora] num_tasks, num_skills, r "
            "and heads must be >= 1, got ", o.num_tasks, ", ", o.num_skills, ", ", o.r, ", ", o.heads);
  MDL_CHECK(o.temperature > 0, "[poly_lora] temperature must be > 0, got ", o.temperature);
}

SkillAllocationImpl::SkillAllocationImpl(const PolyLoraOptions& o, uint64_t seed, c10::TensorOptions dtype) : options(o) {
  auto gen = at::detail::createCPUGenerator(seed);
  // Near-uniform start, as Polytropon's uniform(-1e-3, 1e-3).
  logits = register_parameter("allocation", at::empty({o.num_tasks, o.heads, o.num_skills}).uniform_(-1e-3, 1e-3, gen).to(dtype));
}

at::Tensor SkillAllocationImpl::weights(const at::Tensor& task_ids, bool training) const {
  at::Tensor l = logits.index_select(0, task_ids.to(logits.device(), at::kLong));  // (B, h, S)
  at::Tensor w;
  if (training) {  // relaxed Bernoulli: sigmoid((l + log u - log(1 - u)) / tau)
    at::Tensor u = at::rand_like(l).clamp(1e-6, 1.0 - 1e-6);
    w = at::sigmoid((l + u.log() - (-u).log1p()) / options.temperature);
  } else {
    w = at::sigmoid(l);
  }
  return w / (w.sum(-1, true) + 1e-12);
}

PolyLoraImpl::PolyLoraImpl(const SiteInfo& site, const PolyLoraOptions& o, std::shared_ptr<SkillAllocationImpl> allocation,
                           bool owner, uint64_t seed, c10::TensorOptions dtype)
    : options(o), scaling(o.alpha / static_cast<double>(o.r)), site_(site), allocation_(std::move(allocation)) {
  MDL_CHECK(site.kind == SiteKind::linear, "[poly_lora] '", site.name, "' is not a linear site");
  const int64_t S = o.num_skills, in = site.in_features, out = site.out_features;
  MDL_CHECK(in % o.heads == 0 && out % o.heads == 0, "[poly_lora] '", site.name, "': ", o.heads, " heads must divide ",
            "the input (", in, ") and output (", out, ") widths");
  auto gen = at::detail::createCPUGenerator(seed);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  A = register_parameter("lora_A", at::empty({S, o.r, in}).uniform_(-bound, bound, gen).to(dtype));
  B = register_parameter("lora_B", at::zeros({S, out, o.r}).to(dtype));
  if (owner) register_module("allocation", allocation_);
}

std::pair<at::Tensor, at::Tensor> PolyLoraImpl::task_factors(const at::Tensor& w) const {
  const int64_t S = options.num_skills, h = options.heads, r = options.r;
  const int64_t in = A.size(2), out = B.size(1), Bn = w.size(0);
  at::Tensor wa = w.to(A.scalar_type());
  // Head j of A covers input columns [j in/h, (j+1) in/h); head j of B covers output rows likewise.
  at::Tensor a = at::einsum("bhs,srhd->brhd", {wa, A.view({S, r, h, in / h})}).reshape({Bn, r, in});
  at::Tensor b = at::einsum("bhs,shor->bhor", {wa, B.view({S, h, out / h, r})}).reshape({Bn, out, r});
  return {a, b};
}

at::Tensor PolyLoraImpl::forward(const at::Tensor& input, const at::Tensor& current) {
  MDL_CHECK(input.dim() == 3 || input.dim() == 2, "[poly_lora] '", site_.name, "' expects (B, T, in) or (B, in) inputs, got ",
            input.sizes());
  if (input.dim() == 2) return forward(input.unsqueeze(1), current.unsqueeze(1)).squeeze(1);  // a head on pooled rows
  const at::Tensor& ids = current_task_ids(site_.name, input.size(0), options.num_tasks);
  const ForwardContext& ctx = ForwardContext::current();
  at::Tensor w = allocation_->weights(ids, is_training());  // (B, h, S)
  if (ctx.routing_log) {
    Routing r;
    r.rows = w.size(0);
    r.experts = options.num_skills;
    r.dense = w.detach().mean(1);
    set_sparse_from_dense(r, true);
    r.requested = r.rows;
    ctx.routing_log->record(site_.name, r, RouterOptions());
  }
  auto [a, b] = task_factors(w);
  at::Tensor x = input.to(A.scalar_type());
  at::Tensor y = at::bmm(at::bmm(x, a.transpose(1, 2)), b.transpose(1, 2)) * scaling;  // (B, T, out)
  return current + y.to(current.scalar_type());
}

}  // namespace mdl
