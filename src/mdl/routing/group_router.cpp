#include "mdl/routing/group_router.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "mdl/core/error.h"
#include "mdl/core/forward_context.h"
#include "mdl/routing/routing_context.h"
#include "mdl/routing/routing_log.h"

namespace mdl {
LearnedRouter::LearnedRouter(std::string site, std::string shared_key, const RouterOptions& options,
                             at::Tensor gate, std::string gate_name, at::Tensor task_logits)
    : site_(std::move(site)),
      shared_key_(std::move(shared_key)),
      gate_name_(std::move(gate_name)),
      gate_(std::move(gate)),
      task_logits_(std::move(task_logits)) {
  score_ = [this](const at::Tensor& rows) { return at::matmul(rows.to(gate_.scalar_type()), gate_.t()); };
  set_options(options);
}

LearnedRouter::LearnedRouter(std::string site, std::string shared_key, const RouterOptions& options,
                             GateFn gate)
    : site_(std::move(site)), shared_key_(std::move(shared_key)), score_(std::move(gate)) {
  set_options(options);
}

void LearnedRouter::set_options(const RouterOptions& o) {
  MDL_CHECK(o.level != "task" || task_logits_.defined(), "[routing] '", site_,
            "' has no per-task logits, so it cannot "
            "route by task; create its module with num_tasks > 0 (a backbone's expert gates score tokens)");
  policy_ = make_router(o);
}

void LearnedRouter::register_parameters(torch::nn::Module& owner) {
  if (gate_.defined() && !gate_name_.empty()) gate_ = owner.register_parameter(gate_name_, gate_);
  if (task_logits_.defined()) task_logits_ = owner.register_parameter("task_logits", task_logits_);
}

void check_scores_tokens(const std::string& owner, const RouterOptions& options) {
  MDL_CHECK(options.level != "task", "[routing] ", owner,
            ": its gate scores tokens; task-level routing needs per-task logits (use a poly_lora or lora_moe "
            "module)");
}

Routing LearnedRouter::route(const at::Tensor& input, int64_t members, bool training) const {
  return route_tokens(*policy_, site_, shared_key_, input, members, score_, task_logits_, training);
}

SkillAllocationImpl::SkillAllocationImpl(const SkillAllocationOptions& o, uint64_t seed,
                                         c10::TensorOptions dtype)
    : options(o) {
  MDL_CHECK(o.num_tasks >= 1 && o.num_skills >= 1 && o.heads >= 1,
            "[routing] a skill allocation needs num_tasks, "
            "num_skills and heads >= 1, got ",
            o.num_tasks, ", ", o.num_skills, ", ", o.heads);
  auto gen = at::detail::createCPUGenerator(seed);
  // Near-uniform start, as Polytropon's uniform(-1e-3, 1e-3).
  logits = register_parameter(
      "allocation", at::empty({o.num_tasks, o.heads, o.num_skills}).uniform_(-1e-3, 1e-3, gen).to(dtype));
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

SkillAllocationRouter::SkillAllocationRouter(std::string site,
                                             std::shared_ptr<SkillAllocationImpl> allocation, bool owner)
    : site_(std::move(site)), allocation_(std::move(allocation)), owner_(owner) {}

void SkillAllocationRouter::register_parameters(torch::nn::Module& owner) {
  if (owner_) owner.register_module("allocation", allocation_);
}

Routing SkillAllocationRouter::route(const at::Tensor& input, int64_t members, bool training) const {
  const SkillAllocationOptions& o = allocation_->options;
  MDL_CHECK(members == o.num_skills, "[routing] '", site_, "': the allocation has ", o.num_skills,
            " skills, the group ", members, " members");
  const at::Tensor& ids = current_task_ids(site_, input.size(0), o.num_tasks);
  Routing r;
  r.head_dense = allocation_->weights(ids, training);  // (B, h, S)
  r.rows = r.head_dense.size(0);
  r.experts = o.num_skills;
  if (const ForwardContext& ctx = ForwardContext::current(); ctx.routing_log) {
    Routing logged = r;
    logged.dense = r.head_dense.detach().mean(1);
    set_sparse_from_dense(logged, true);
    logged.requested = logged.rows;
    ctx.routing_log->record(site_, logged, RouterOptions());
  }
  return r;
}

}  // namespace mdl
