// Aggregators against their formulas, written out per row: a weighted sum over routed members that read
// the current output or do not, parameter averaging with heads, and the refusals.
#include "mdl/aggregation/aggregator.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/utils.h>

#include "mdl/modules/module_group.h"
#include "test_util.h"

namespace mdl {
namespace {

/// Two members: e = 0 adds 2x (ignores the current output), e = 1 maps h to tanh(h) + x.
GroupMembers toy_members(bool reads_current) {
  GroupMembers m;
  m.count = 2;
  m.out_features = 4;
  m.reads_current = reads_current;
  m.change = [](int64_t e, const at::Tensor& x, const at::Tensor& h) {
    if (e == 0) return 2 * x;
    return at::tanh(h) + x - h;
  };
  return m;
}

/// Row r of 6 to expert (r % 2) at weight (r + 1) / 10, and rows 0 and 3 also to the other one at 0.5.
Routing toy_routing() {
  Routing r;
  r.rows = 6;
  r.experts = 2;
  r.row = at::tensor({0, 1, 2, 3, 4, 5, 0, 3}, at::kLong);
  r.expert = at::tensor({0, 1, 0, 1, 0, 1, 1, 0}, at::kLong);
  r.weight = at::tensor({0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.5, 0.5}, at::kFloat);
  return r;
}

TEST(WeightedSum, EqualsTheSumOverEachRowsMembers) {
  torch::NoGradGuard g;
  at::manual_seed(1);
  const at::Tensor x = at::randn({2, 3, 4}), h = at::randn({2, 3, 4});
  const Routing r = toy_routing();
  WeightedSum sum;
  sum.keep_weights(true);
  const at::Tensor got = sum.combine(x, h, r, toy_members(true));
  at::Tensor want = at::zeros({6, 4});
  const at::Tensor xr = x.reshape({6, 4}), hr = h.reshape({6, 4});
  const GroupMembers m = toy_members(true);
  for (int64_t i = 0; i < r.row.numel(); ++i) {
    const int64_t row = r.row[i].item<int64_t>(), e = r.expert[i].item<int64_t>();
    want[row] += r.weight[i].item<float>() * m.change(e, xr[row], hr[row]);
  }
  EXPECT_CLOSE(got, want.view({2, 3, 4}), 1e-6);
  EXPECT_CLOSE(sum.last_weights().sum(-1).reshape({-1}), at::tensor({0.6, 0.2, 0.3, 0.9, 0.5, 0.6}), 1e-6);
  // Members that do not read the current output run without it; the example-level routing of 2 rows
  // expands to their tokens.
  Routing per_example;
  per_example.rows = 2;
  per_example.experts = 2;
  per_example.row = at::tensor({0, 1}, at::kLong);
  per_example.expert = at::tensor({0, 0}, at::kLong);
  per_example.weight = at::tensor({1.0, 0.5}, at::kFloat);
  const at::Tensor alone = sum.combine(x, at::Tensor(), per_example, toy_members(false));
  EXPECT_CLOSE(alone[0], 2 * x[0], 1e-6);
  EXPECT_CLOSE(alone[1], x[1], 1e-6);
  EXPECT_THROW_WITH(sum.combine(x, at::Tensor(), r, toy_members(true)), "read the current output");
}

TEST(ParameterAverage, AveragesEachHeadsSliceWithItsWeights) {
  torch::NoGradGuard g;
  at::manual_seed(2);
  const at::Tensor A = at::randn({3, 2, 4}), B = at::randn({3, 6, 2});  // 3 LoRAs of rank 2, 4 -> 6
  GroupMembers m;
  m.count = 3;
  m.out_features = 6;
  m.stacked_low_rank = [&](at::Tensor& a, at::Tensor& b, double& s) {
    a = A, b = B, s = 0.5;
    return true;
  };
  const at::Tensor x = at::randn({2, 5, 4});
  Routing r;  // per example and head: example 0 head 0 -> LoRA 0, head 1 -> LoRA 2; example 1 an even mix
  r.rows = 2;
  r.experts = 3;
  r.head_dense = at::zeros({2, 2, 3});
  r.head_dense[0][0][0] = 1, r.head_dense[0][1][2] = 1;
  r.head_dense[1].fill_(1.0 / 3);
  ParameterAverage avg(2);
  const at::Tensor got = avg.combine(x, at::Tensor(), r, m);
  // Example 0: A's first two input columns from LoRA 0, the last two from LoRA 2; B's rows likewise.
  at::Tensor a0 = at::cat({A[0].narrow(1, 0, 2), A[2].narrow(1, 2, 2)}, 1);
  at::Tensor b0 = at::cat({B[0].narrow(0, 0, 3), B[2].narrow(0, 3, 3)}, 0);
  EXPECT_CLOSE(got[0], 0.5 * at::matmul(at::matmul(x[0], a0.t()), b0.t()), 1e-5);
  at::Tensor a1 = A.mean(0), b1 = B.mean(0);
  EXPECT_CLOSE(got[1], 0.5 * at::matmul(at::matmul(x[1], a1.t()), b1.t()), 1e-5);

  GroupMembers not_lora = m;
  not_lora.stacked_low_rank = [](at::Tensor&, at::Tensor&, double&) { return false; };
  EXPECT_THROW_WITH(avg.combine(x, at::Tensor(), r, not_lora),
                    "parameter averaging needs members that are LoRAs");
  r.head_dense = at::zeros({2, 1, 3});
  EXPECT_THROW_WITH(avg.combine(x, at::Tensor(), r, m), "over 2 heads needs weights (B, 2, 3)");
}

TEST(ExampleWeights, ReadsPerExampleOrTheFirstTokenOfPerTokenRoutings) {
  Routing r;
  r.rows = 6;
  r.experts = 2;
  r.dense = at::arange(12, at::kFloat).view({6, 2});
  set_sparse_from_dense(r, true);
  const at::Tensor w = example_weights(r, 2, 3);  // tokens 0 and 3 are the examples' first
  EXPECT_TRUE(at::equal(w, at::tensor({0.f, 1.f, 6.f, 7.f}).view({2, 1, 2})));
  EXPECT_THROW_WITH(example_weights(r, 4, 2), "neither per example (4) nor per token (8)");
}

// A group without a router is one whose aggregator weighs every member itself; one that reads a routing
// and has none is refused when it is made.
TEST(ModuleGroup, AnAggregatorThatReadsARoutingNeedsARouter) {
  SiteInfo site;
  site.name = "s";
  site.in_features = site.out_features = 4;
  EXPECT_THROW_WITH(
      ModuleGroupImpl("mix", site, toy_members(true), {}, nullptr, std::make_shared<WeightedSum>()),
      "[group] 's': a mix's weighted_sum reads a routing, so it needs a router");
}

}  // namespace
}  // namespace mdl
