// A group's router: which of a group's members (the modules or experts behind one site) each row of the
// site's input uses, and with what weight. Algorithm 1's route when it is learned or decided inside the
// forward; fixed routes (active flags, each example's list, a task's table) are `ModuleRouting`, decided
// before it. A group whose aggregator weighs every member itself (AdapterFusion's attention, a gate) has
// no router. Every kind returns one `Routing`, which the group's aggregator reads:
//   learned           scores of the site's input (a gate's weights, or a backbone's gate projection) or
//                     learned per-task logits, then any policy (RouterOptions: top-k, Switch, softmax, expert
//                     choice, hash, Gumbel) at token, example or task level (routing/mixture.h)
//   skill allocation  Polytropon's task-by-skill allocation (relaxed Bernoulli in training, sigmoid at
//                     evaluation, rows normalised); multi-head routing (MHR) gives each head its own weights
// A router's parameters are registered by the module that holds it, under the names the router gives, so
// a file's tensor names do not depend on how the parts are arranged.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <memory>
#include <string>

#include "mdl/routing/mixture.h"
#include "mdl/routing/router.h"

namespace mdl {

/// Routes a site's input over a group's members.
class GroupRouter {
 public:
  virtual ~GroupRouter() = default;
  /// The routing of `input` (B, T, C) over `members` members: B*T token rows, or B example rows when the
  /// decision is per example and carries per-head weights (skill allocation).
  virtual Routing route(const at::Tensor& input, int64_t members, bool training) const = 0;
  /// Registers this router's parameters in `owner` (the module that holds the group).
  virtual void register_parameters(torch::nn::Module& owner) {}
};

/// Refuses task-level routing for a router over token scores (a backbone's gate): `owner` names it.
void check_scores_tokens(const std::string& owner, const RouterOptions& options);

/// A learned router: a policy over scores of the site's input, or over per-task logits.
class LearnedRouter : public GroupRouter {
 public:
  /// Scores from `gate` (E, in), a parameter registered as `gate_name`; `task_logits` (tasks, E), registered
  /// as "task_logits", for task-level routing (else undefined). `shared_key` names the decision that
  /// RouterOptions::shared reuses across layers.
  LearnedRouter(std::string site, std::string shared_key, const RouterOptions& options, at::Tensor gate,
                std::string gate_name, at::Tensor task_logits = {});
  /// Scores from a function the owner computes (a backbone's gate projection, registered by the backbone).
  LearnedRouter(std::string site, std::string shared_key, const RouterOptions& options, GateFn gate);
  LearnedRouter(const LearnedRouter&) = delete;  // its scores read its own gate
  LearnedRouter& operator=(const LearnedRouter&) = delete;
  Routing route(const at::Tensor& input, int64_t members, bool training) const override;
  void register_parameters(torch::nn::Module& owner) override;
  /// Replaces the policy; the scores' parameters stay. Task level needs per-task logits.
  void set_options(const RouterOptions& options);
  const RouterOptions& options() const { return policy_->options(); }
  const Router& policy() const { return *policy_; }
  const at::Tensor& gate() const { return gate_; }
  const at::Tensor& task_logits() const { return task_logits_; }

 private:
  std::string site_, shared_key_, gate_name_;
  std::shared_ptr<Router> policy_;
  at::Tensor gate_, task_logits_;
  GateFn score_;
};

/// Polytropon / MHR settings of the allocation.
struct SkillAllocationOptions {
  int64_t num_tasks = 1;
  int64_t num_skills = 4;
  int64_t heads = 1;         ///< MHR heads (1 = Polytropon)
  double temperature = 1.0;  ///< relaxed-Bernoulli temperature (training)
};

/// The task-by-skill allocation logits (tasks, heads, skills), shared by the sites of a module or not.
class SkillAllocationImpl : public torch::nn::Module {
 public:
  SkillAllocationImpl(const SkillAllocationOptions& options, uint64_t seed, c10::TensorOptions dtype);
  /// Normalised skill weights (B, heads, skills) for task ids (B): relaxed-Bernoulli samples in training.
  at::Tensor weights(const at::Tensor& task_ids, bool training) const;
  SkillAllocationOptions options;
  at::Tensor logits;  // (tasks, heads, skills)
};
TORCH_MODULE(SkillAllocation);

/// Routes each example by its task's row of the allocation (task ids from the forward's routing context):
/// B example rows, `dense` the heads' mean weights, `head_dense` (B, heads, S) each head's.
class SkillAllocationRouter : public GroupRouter {
 public:
  /// `owner`: the holder registers the allocation as its submodule "allocation" (one site of a shared one).
  SkillAllocationRouter(std::string site, std::shared_ptr<SkillAllocationImpl> allocation, bool owner);
  Routing route(const at::Tensor& input, int64_t members, bool training) const override;
  void register_parameters(torch::nn::Module& owner) override;
  const std::shared_ptr<SkillAllocationImpl>& allocation() const { return allocation_; }

 private:
  std::string site_;
  std::shared_ptr<SkillAllocationImpl> allocation_;
  bool owner_;
};

}  // namespace mdl
