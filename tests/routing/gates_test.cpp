// ModuleFormer's gates against their formulas written out per row: linear, mlp (Linear-GELU-Linear) and
// gmm (cosine to the experts' centroids in a projected space, times e^tau); every parameter learns, and a
// learned router routes on their scores.
#include "mdl/routing/gates.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/utils.h>

#include <cmath>

#include "mdl/routing/group_router.h"
#include "test_util.h"

namespace mdl {
namespace {

at::Tensor param(const Gate& g, const std::string& name) {
  return g->named_parameters()[name];
}

TEST(Gates, EachEqualsItsFormula) {
  at::manual_seed(10);
  const at::Tensor x = at::randn({5, 8});
  GateOptions o;
  o.bias = true;
  Gate linear(o, 8, 3, 1, at::kFloat);
  {
    torch::NoGradGuard g;
    param(linear, "w_gate.0.bias").normal_();
  }
  EXPECT_CLOSE(linear->scores(x),
               at::matmul(x, param(linear, "w_gate.0.weight").t()) + param(linear, "w_gate.0.bias"), 1e-6);
  o.kind = "mlp";
  o.hidden = 16;
  Gate mlp(o, 8, 3, 2, at::kFloat);
  at::Tensor h = at::matmul(x, param(mlp, "w_gate.0.weight").t()) + param(mlp, "w_gate.0.bias");
  h = 0.5 * h * (1 + at::erf(h / std::sqrt(2.0)));
  EXPECT_CLOSE(mlp->scores(x), at::matmul(h, param(mlp, "w_gate.3.weight").t()), 1e-5);
  o.kind = "gmm";
  Gate gmm(o, 8, 3, 3, at::kFloat);
  {
    torch::NoGradGuard g;
    param(gmm, "temperature").fill_(std::log(2.0));
  }
  const at::Tensor z = at::matmul(x, param(gmm, "w_gate.weight").t()), c = param(gmm, "expert_centroids");
  for (int64_t n = 0; n < 5; ++n)
    for (int64_t e = 0; e < 3; ++e) {
      const double cos =
          (z[n] * c[e]).sum().item<double>() / (z[n].norm().item<double>() * c[e].norm().item<double>());
      EXPECT_NEAR(gmm->scores(x)[n][e].item<double>(), 2 * cos, 1e-5) << n << "," << e;
    }
  o.kind = "softmax";
  EXPECT_THROW_WITH(Gate(o, 8, 3, 4, at::kFloat),
                    "[gate] kind 'softmax' is unknown; expected linear, mlp or gmm");
}

TEST(Gates, EveryParameterLearnsThroughALearnedRouter) {
  for (const std::string kind : {"linear", "mlp", "gmm"}) {
    GateOptions o;
    o.kind = kind;
    o.hidden = 16;
    Gate gate(o, 8, 4, 5, at::kFloat);
    RouterOptions softmax;
    softmax.kind = "softmax";
    LearnedRouter router("site", "gates", softmax,
                         [gate](const at::Tensor& rows) { return gate->scores(rows); });
    const Routing r = router.route(at::randn({2, 3, 8}), 4, true);
    EXPECT_EQ(r.rows, 6) << kind;
    (r.dense_weights() * at::randn({6, 4})).sum().backward();
    for (const auto& p : gate->named_parameters())
      EXPECT_GT(p.value().grad().abs().sum().item<double>(), 0.0) << kind << " " << p.key();
  }
}

}  // namespace
}  // namespace mdl
