// The router of a backbone's mixture-of-experts MLPs (Mixtral, upcycled Llama or ViT), shared by the
// architectures that have them: what the config asks for, and the check that their expert gates score
// tokens.
#pragma once

#include <memory>

#include "mdl/io/model_config.h"
#include "mdl/routing/router.h"

namespace mdl {

/// The config's router: top-k over num_experts_per_tok experts (weights renormalised) with the config's
/// load-balancing coefficient, or mdl's `mdl_router` field when present.
RouterOptions config_router(const ModelConfig& config);

/// A router for the expert gates of `config`'s architecture; task-level routing is refused (the gates
/// score tokens; per-task logits need a poly_lora or lora_moe module).
std::shared_ptr<Router> make_expert_router(const ModelConfig& config, const RouterOptions& options);

}  // namespace mdl
