#include "mdl/backbones/expert_router.h"

#include <nlohmann/json.hpp>

#include "mdl/core/error.h"

namespace mdl {

RouterOptions config_router(const ModelConfig& c) {
  if (!c.router_json.empty()) return nlohmann::json::parse(c.router_json).get<RouterOptions>();
  RouterOptions router;
  router.kind = "top_k";
  router.k = c.experts_per_token;
  router.load_balancing_coef = c.router_aux_loss_coef;
  return router;
}

std::shared_ptr<Router> make_expert_router(const ModelConfig& c, const RouterOptions& options) {
  MDL_CHECK(options.level != "task", "[model] ", c.architecture, "'s expert gates score tokens; task-level "
            "routing needs per-task logits (use a poly_lora or lora_moe module)");
  return make_router(options);
}

}  // namespace mdl
