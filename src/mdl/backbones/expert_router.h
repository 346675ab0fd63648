// The mixture-of-experts MLPs of backbones (Mixtral, upcycled Llama or ViT), shared by the architectures
// that have them: the router the config asks for, the check that their expert gates score tokens, and
// the routed MLP step itself.
#pragma once

#include <memory>

#include "mdl/io/model_config.h"
#include "mdl/routing/mixture.h"
#include "mdl/routing/router.h"

namespace mdl {

/// The config's router: top-k over num_experts_per_tok experts (weights renormalised) with the config's
/// load-balancing coefficient, or mdl's `mdl_router` field when present.
RouterOptions config_router(const ModelConfig& config);

/// A router for the expert gates of `config`'s architecture; task-level routing is refused (the gates
/// score tokens; per-task logits need a poly_lora or lora_moe module).
std::shared_ptr<Router> make_expert_router(const ModelConfig& config, const RouterOptions& options);

/// One sparse MLP step over m (B, T, C): every token routed by `router` on `gate`'s logits, each expert
/// run once on its tokens, the weighted outputs summed; returns (B, T, C).
at::Tensor expert_mlp(const Router& router, const std::string& site, const std::string& shared_key, const at::Tensor& m,
                      int64_t experts, const GateFn& gate, const ExpertFn& expert, bool training);

}  // namespace mdl
