#include "mdl/backbones/expert_router.h"

#include <ATen/ATen.h>
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

at::Tensor expert_mlp(const Router& router, const std::string& site, const std::string& shared_key, const at::Tensor& m,
                      int64_t experts, const GateFn& gate, const ExpertFn& expert, bool training) {
  const int64_t B = m.size(0), T = m.size(1), C = m.size(2);
  Routing r = route_tokens(router, site, shared_key, m, experts, gate, at::Tensor(), training);
  return dispatch(m.reshape({B * T, C}), r, C, expert).view({B, T, C});
}

}  // namespace mdl
