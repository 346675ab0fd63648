// A group's routers: a learned router over its own gate or a backbone's scores, with its policy swapped
// and task-level routing only with per-task logits; the skill allocation's rows and heads; every member.
#include "mdl/routing/group_router.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/nn/module.h>
#include <torch/utils.h>

#include "mdl/core/forward_context.h"
#include "mdl/routing/routing_context.h"
#include "mdl/routing/routing_log.h"
#include "test_util.h"

namespace mdl {
namespace {

TEST(LearnedRouter, RoutesTheGatesScoresUnderItsPolicyAndSwapsIt) {
  torch::NoGradGuard g;
  at::manual_seed(3);
  RouterOptions top1;
  top1.k = 1;
  top1.normalize = false;
  LearnedRouter router("site", "key", top1, at::randn({3, 4}), "router");
  torch::nn::Module owner;
  router.register_parameters(owner);
  ASSERT_EQ(owner.named_parameters().size(), 1u);
  EXPECT_TRUE(owner.named_parameters()["router"].is_same(router.gate()));
  const at::Tensor x = at::randn({2, 5, 4});
  Routing r = router.route(x, 3, false);
  EXPECT_EQ(r.rows, 10);
  at::Tensor p = at::softmax(at::matmul(x.reshape({10, 4}), router.gate().t()), -1);
  EXPECT_TRUE(at::equal(r.dense_weights().argmax(-1), p.argmax(-1)));
  EXPECT_CLOSE(r.dense_weights().sum(-1), std::get<0>(p.max(-1)), 1e-6);
  RouterOptions dense;
  dense.kind = "softmax";
  router.set_options(dense);
  EXPECT_CLOSE(router.route(x, 3, false).dense_weights(), p, 1e-6);
  dense.level = "task";
  EXPECT_THROW_WITH(router.set_options(dense), "'site' has no per-task logits", "num_tasks > 0");

  // Scores from a function (a backbone's gate projection): nothing to register.
  LearnedRouter scored("s2", "key", top1, [](const at::Tensor& rows) { return rows.narrow(1, 0, 2); });
  torch::nn::Module none;
  scored.register_parameters(none);
  EXPECT_TRUE(none.named_parameters().is_empty());
  EXPECT_TRUE(at::equal(scored.route(x, 2, false).dense_weights().argmax(-1),
                        x.reshape({10, 4}).narrow(1, 0, 2).argmax(-1)));
}

TEST(SkillAllocationRouter, RoutesEachExampleByItsTasksRowPerHeadAndLogsIt) {
  torch::NoGradGuard g;
  SkillAllocationOptions o;
  o.num_tasks = 3;
  o.num_skills = 4;
  o.heads = 2;
  auto allocation = std::make_shared<SkillAllocationImpl>(o, 5, at::kFloat);
  allocation->logits.normal_();
  SkillAllocationRouter router("site", allocation, true);
  RoutingContext rc;
  rc.task_ids = at::tensor({2, 0}, at::kLong);
  RoutingLog log;
  ForwardContext fc;
  fc.routing = &rc;
  fc.routing_log = &log;
  ForwardContextGuard guard(fc);
  Routing r = router.route(at::randn({2, 7, 8}), 4, false);
  EXPECT_EQ(r.rows, 2);
  at::Tensor w = at::sigmoid(allocation->logits.index_select(0, rc.task_ids));
  EXPECT_CLOSE(r.head_dense, w / w.sum(-1, true), 1e-6);
  ASSERT_EQ(log.stats().size(), 1u);
  EXPECT_EQ(log.stats()[0].site, "site");
  EXPECT_THROW_WITH(router.route(at::randn({2, 7, 8}), 3, false),
                    "the allocation has 4 skills, the group 3 members");
  torch::nn::Module owner;
  router.register_parameters(owner);
  EXPECT_TRUE(owner.named_parameters().contains("allocation.allocation"));
}

}  // namespace
}  // namespace mdl
