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

ExpertMlp::ExpertMlp(const ModelConfig& config, const RouterOptions& options, std::string site,
                     std::string shared_key, GateFn gate, int64_t experts, ExpertFn expert)
    : architecture_(config.architecture) {
  check_scores_tokens(architecture_ + "'s expert MLP", options);
  router_ = std::make_shared<LearnedRouter>(std::move(site), std::move(shared_key), options, std::move(gate));
  experts_.count = experts;
  experts_.out_features = config.hidden_size;
  experts_.reads_current = false;
  experts_.change = [expert = std::move(expert)](int64_t e, const at::Tensor& rows, const at::Tensor&) {
    return expert(e, rows);
  };
}

at::Tensor ExpertMlp::forward(const at::Tensor& m, bool training) {
  const Routing r = router_->route(m, experts_.count, training);  // route
  return sum_.combine(m, at::Tensor(), r, experts_);              // compute and aggregate
}

void ExpertMlp::set_router(const RouterOptions& options) {
  check_scores_tokens(architecture_ + "'s expert MLP", options);
  router_->set_options(options);
}

}  // namespace mdl
