#include "mdl/modules/compacter.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/core/fields.h"
#include "mdl/ops/functional.h"

namespace mdl {

void to_json(nlohmann::json& j, const CompacterOptions& o) {
  j = compacter_fields().write(o);
}

const FieldList<CompacterOptions>& compacter_fields() {
  static const FieldList<CompacterOptions> f =
      FieldList<CompacterOptions>("compacter")
          .add("config", &CompacterOptions::config, "pfeiffer (Compacter++) | houlsby (Compacter)")
          .add("reduction_factor", &CompacterOptions::reduction_factor,
               "bottleneck = hidden / reduction_factor, rounded to a multiple of phm_dim")
          .add("phm_dim", &CompacterOptions::phm_dim,
               "n: Kronecker terms and the size of the shared rule matrices")
          .add("phm_rank", &CompacterOptions::phm_rank, "rank of the per-layer factors")
          .add("non_linearity", &CompacterOptions::non_linearity, "relu | gelu | silu | tanh")
          .check([](const CompacterOptions& o) { validate(o); });
  return f;
}

void validate(const CompacterOptions& o) {
  MDL_CHECK(o.config == "pfeiffer" || o.config == "houlsby", "[compacter] config '", o.config,
            "' is unknown; expected pfeiffer or houlsby");
  MDL_CHECK(o.reduction_factor > 0 && o.phm_dim > 0 && o.phm_rank > 0,
            "[compacter] reduction_factor, phm_dim and phm_rank must be > 0");
  MDL_CHECK(o.non_linearity == "relu" || o.non_linearity == "gelu" || o.non_linearity == "silu" ||
                o.non_linearity == "tanh",
            "[compacter] non_linearity '", o.non_linearity,
            "' is unknown; expected relu, gelu, silu or tanh");
}

void from_json(const nlohmann::json& j, CompacterOptions& o) {
  o = compacter_fields().read(j);
}

PhmRulesImpl::PhmRulesImpl(int64_t n, uint64_t seed, c10::TensorOptions dtype) {
  auto gen = at::detail::createCPUGenerator(seed);
  const double b = 1.0 / std::sqrt(static_cast<double>(n));
  down = register_parameter("phm_rule_down", at::empty({n, n, n}).uniform_(-b, b, gen).to(dtype));
  up = register_parameter("phm_rule_up", at::empty({n, n, n}).uniform_(-b, b, gen).to(dtype));
}

at::Tensor phm_weight(const at::Tensor& rule, const at::Tensor& left, const at::Tensor& right) {
  const int64_t n = rule.size(0), P = left.size(1), Q = right.size(2);
  at::Tensor factors = at::matmul(left, right);                 // (n, P, Q)
  at::Tensor w = at::einsum("ijk,ipq->jpkq", {rule, factors});  // (n, P, n, Q): kron(rule_i, factor_i) summed
  return w.reshape({n * P, n * Q});                             // (in, out)
}

CompacterImpl::CompacterImpl(const SiteInfo& site, const CompacterOptions& o,
                             std::shared_ptr<PhmRulesImpl> rules, bool owner, uint64_t seed,
                             c10::TensorOptions dtype)
    : options(o), rules_(std::move(rules)) {
  MDL_CHECK(site.kind == SiteKind::sublayer, "[compacter] '", site.name,
            "' is not an attention or MLP sublayer site");
  const int64_t C = site.out_features, n = o.phm_dim, r = o.phm_rank;
  MDL_CHECK(C % n == 0, "[compacter] hidden size ", C, " is not divisible by phm_dim ", n);
  bottleneck = std::max<int64_t>(n, (C / o.reduction_factor) / n * n);
  if (owner) register_module("phm_rules", rules_);
  auto gen = at::detail::createCPUGenerator(seed);
  auto uni = [&](std::vector<int64_t> shape, double b) {
    return at::empty(shape).uniform_(-b, b, gen).to(dtype);
  };
  down_left = register_parameter("W_down_left", uni({n, C / n, r}, 1.0 / std::sqrt(double(C / n))));
  down_right = register_parameter("W_down_right", uni({n, r, bottleneck / n}, 1.0 / std::sqrt(double(r))));
  down_bias = register_parameter("b_down", at::zeros({bottleneck}, dtype));
  up_left =
      register_parameter("W_up_left", uni({n, bottleneck / n, r}, 1.0 / std::sqrt(double(bottleneck / n))));
  up_right = register_parameter("W_up_right",
                                at::zeros({n, r, C / n}, dtype));  // zero: a new adapter is the identity
  up_bias = register_parameter("b_up", at::zeros({C}, dtype));
}

at::Tensor CompacterImpl::forward(const at::Tensor& input, const at::Tensor& current) {
  at::Tensor w_down = phm_weight(rules_->down, down_left, down_right);  // (C, bottleneck)
  at::Tensor w_up = phm_weight(rules_->up, up_left, up_right);          // (bottleneck, C)
  at::Tensor z = at::matmul(current, w_down) + down_bias;               // (B, T, bottleneck)
  z = options.non_linearity == "tanh" ? at::tanh(z) : fn::activation(z, options.non_linearity);
  return current + at::matmul(z, w_up) + up_bias;  // residual
}

}  // namespace mdl
