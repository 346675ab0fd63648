// The mixture-of-experts MLPs of backbones (Mixtral, upcycled Llama or ViT): each layer's feed-forward
// experts are a group's members (modules/module_group.h) behind a LearnedRouter over the layer's gate
// projection, combined by a WeightedSum. These are the router and aggregator parts every mixture in mdl
// uses (fusion mixtures of adapters, lora_moe), so router swaps (--router), routing statistics and grouped
// dispatch are one code path for LoRA, adapter and feed-forward experts.
#pragma once

#include <memory>
#include <string>

#include "mdl/aggregation/aggregator.h"
#include "mdl/io/model_config.h"
#include "mdl/routing/group_router.h"
#include "mdl/routing/mixture.h"
#include "mdl/routing/router.h"

namespace mdl {

/// The config's router: top-k over num_experts_per_tok experts (weights renormalised) with the config's
/// load-balancing coefficient, or mdl's `mdl_router` field when present.
RouterOptions config_router(const ModelConfig& config);

/// One layer's sparse MLP.
class ExpertMlp {
 public:
  /// `gate` scores tokens (the layer's gate projection, C -> E), `expert` runs expert e on its rows
  /// (n, C) -> (n, C); the routing is recorded under `site`, and shared across layers under `shared_key`.
  ExpertMlp(const ModelConfig& config, const RouterOptions& options, std::string site, std::string shared_key,
            GateFn gate, int64_t experts, ExpertFn expert);
  /// Every token routed, each expert run once on its tokens, the weighted outputs summed: m (B, T, C) ->
  /// (B, T, C).
  at::Tensor forward(const at::Tensor& m, bool training);
  /// Replaces the routing policy; task-level routing is refused (the gates score tokens; per-task logits
  /// need a poly_lora or lora_moe module).
  void set_router(const RouterOptions& options);
  const Router& policy() const { return router_->policy(); }

 private:
  std::string architecture_;
  std::shared_ptr<LearnedRouter> router_;
  GroupMembers experts_;
  WeightedSum sum_;
};

}  // namespace mdl
