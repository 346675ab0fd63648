// A module group: members behind one site, a router that chooses among them and an aggregator that
// combines them: Algorithm 1 (route, compute, aggregate) for routes that are learned or decided inside the
// forward. Fusion (attention, gate, mixture), mixtures of LoRAs (MoLoRA, SMEAR) and Polytropon are groups
// that differ only in their members, router and aggregator; a Mixtral or upcycled ViT MLP runs its
// feed-forward experts through the same router and aggregator parts (backbones/expert_router.h).
//
// A group is itself one entry of its site (AttachedModules), so the site's fixed route (active flags, each
// example's list) turns it on or off, weighs it and orders it among the other modules like any module.
// Members are either other modules loaded at the same site (a fusion's: they keep their parameters and are
// skipped by the site while the group is active) or the group's own stacked LoRA experts (lora_moe and
// poly_lora hold A (E, r, in) and B (E, out, r), as their files always have).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "mdl/aggregation/aggregator.h"
#include "mdl/modules/site_module.h"
#include "mdl/routing/group_router.h"

namespace mdl {

/// Members that are modules of their own: a member's change is module(x, current) - current.
GroupMembers module_members(const std::vector<std::shared_ptr<SiteModule>>& modules, int64_t out_features,
                            const std::string& site);
/// Members that are LoRA experts stacked in A (E, r, in) and B (E, out, r): member e's change is
/// scaling * (x A_e^T) B_e^T. The tensors are read at each call, so loading and training see them.
GroupMembers stacked_lora_members(const at::Tensor& A, const at::Tensor& B, double scaling);

/// One site's group.
class ModuleGroupImpl : public SiteModule {
 public:
  /// `type` is the module type it is saved as; `absorbed` the site's modules it runs itself (a fusion's).
  /// The router's and aggregator's parameters are registered here under their own names.
  ModuleGroupImpl(std::string type, const SiteInfo& site, GroupMembers members,
                  std::vector<const SiteModule*> absorbed, std::shared_ptr<GroupRouter> router,
                  std::shared_ptr<Aggregator> aggregator);
  /// Route, compute and aggregate: current + aggregator(route(input)). input (B, T, in) or (B, in).
  at::Tensor forward(const at::Tensor& input, const at::Tensor& current) final;
  std::string type() const override { return type_; }
  const std::vector<const SiteModule*>& absorbs() const override { return absorbed_; }
  const SiteInfo& site() const { return site_; }
  /// The router; null where the aggregator weighs every member itself (attention, gate).
  GroupRouter* router() { return router_.get(); }
  Aggregator& aggregator() { return *aggregator_; }
  const GroupMembers& members() const { return members_; }
  /// The members' weights (B, T, N) of the last forward, where the aggregator keeps them.
  const at::Tensor& last_weights() const { return aggregator_->last_weights(); }

 protected:
  /// Replaces the router (its parameters must already be registered).
  void set_group_router(std::shared_ptr<GroupRouter> router) { router_ = std::move(router); }

 private:
  std::string type_;
  SiteInfo site_;
  GroupMembers members_;
  std::vector<const SiteModule*> absorbed_;
  std::shared_ptr<GroupRouter> router_;
  std::shared_ptr<Aggregator> aggregator_;
};
TORCH_MODULE(ModuleGroup);

}  // namespace mdl
