// Every router against a brute-force loop written here, capacity dropping counts, and the auxiliary
// losses on hand-computed inputs.
#include "mdl/routing/router.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "mdl/core/forward_context.h"
#include "mdl/routing/mixture.h"
#include "mdl/routing/routing_context.h"
#include "mdl/routing/routing_log.h"
#include "test_util.h"

namespace mdl {
namespace {

at::Tensor random_logits(int64_t N, int64_t E, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  return at::randn({N, E}, gen, at::kFloat);
}

std::vector<double> softmax_row(const at::Tensor& logits, int64_t n) {
  std::vector<double> p;
  double m = -1e300, z = 0;
  for (int64_t e = 0; e < logits.size(1); ++e) m = std::max(m, logits[n][e].item<double>());
  for (int64_t e = 0; e < logits.size(1); ++e)
    p.push_back(std::exp(logits[n][e].item<double>() - m)), z += p.back();
  for (double& v : p) v /= z;
  return p;
}

std::vector<int64_t> ranked(const std::vector<double>& p) {
  std::vector<int64_t> idx(p.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
  return idx;
}

Routing route(const RouterOptions& o, const at::Tensor& logits, RouterInput in = {}) {
  return make_router(o)->route(logits, logits.defined() ? logits.size(1) : 4, in);
}

void expect_dense_near(const at::Tensor& got, const std::vector<std::vector<double>>& want,
                       double tol = 1e-6) {
  ASSERT_EQ(got.size(0), static_cast<int64_t>(want.size()));
  for (size_t n = 0; n < want.size(); ++n)
    for (size_t e = 0; e < want[n].size(); ++e)
      EXPECT_NEAR(got[n][e].item<double>(), want[n][e], tol) << "row " << n << " expert " << e;
}

TEST(Router, SoftmaxIsDenseSoftmax) {
  at::Tensor logits = random_logits(7, 5, 1);
  RouterOptions o;
  o.kind = "softmax";
  Routing r = route(o, logits);
  std::vector<std::vector<double>> want;
  for (int64_t n = 0; n < 7; ++n) want.push_back(softmax_row(logits, n));
  expect_dense_near(r.dense_weights(), want);
  EXPECT_EQ(r.row.numel(), 35);  // every expert for every row
}

TEST(Router, TopKMatchesBruteForce) {
  at::Tensor logits = random_logits(11, 6, 2);
  for (bool normalize : {true, false}) {
    RouterOptions o;
    o.k = 2;
    o.normalize = normalize;
    Routing r = route(o, logits);
    std::vector<std::vector<double>> want(11, std::vector<double>(6, 0.0));
    for (int64_t n = 0; n < 11; ++n) {
      auto p = softmax_row(logits, n);
      auto idx = ranked(p);
      const double z = normalize ? p[idx[0]] + p[idx[1]] : 1.0;
      want[n][idx[0]] = p[idx[0]] / z;
      want[n][idx[1]] = p[idx[1]] / z;
    }
    expect_dense_near(r.dense_weights(), want);
    EXPECT_EQ(r.requested, 22);
    EXPECT_EQ(r.dropped, 0);
  }
}

// Brute-force capacity: slot by slot (all first choices before any second), rows in order, an expert
// accepts until it holds ceil(cf * N * k / E).
// ModuleFormer's sample_topk: in training the first k - s experts are the most probable and the last s
// are drawn from the others (never repeating one), each weighted by its probability; at evaluation, and
// with s = 0, plain top-k.
TEST(Router, SampleTopKKeepsTheBestAndDrawsTheRest) {
  RouterOptions o;
  o.k = 2;
  o.normalize = false;
  o.sample_topk = 1;
  auto router = make_router(o);
  at::manual_seed(8);
  const at::Tensor logits = at::randn({256, 6});
  const at::Tensor p = at::softmax(logits, -1), best = p.argmax(-1);
  RouterInput training;
  training.training = true;
  const Routing r = router->route(logits, 6, training);
  const at::Tensor first = r.expert.narrow(0, 0, 256), second = r.expert.narrow(0, 256, 256);
  EXPECT_TRUE(at::equal(first, best));
  EXPECT_FALSE((second == best).any().item<bool>());
  EXPECT_CLOSE(r.weight.narrow(0, 256, 256), p.gather(1, second.unsqueeze(1)).squeeze(1), 1e-6);
  // Drawn, not the runner-up every time.
  const at::Tensor runner_up = std::get<1>(p.topk(2, -1)).select(1, 1);
  EXPECT_GT((second != runner_up).sum().item<int64_t>(), 0);
  const Routing eval = router->route(logits, 6, RouterInput());
  EXPECT_TRUE(at::equal(eval.expert.narrow(0, 256, 256), runner_up));
  o.sample_topk = 3;
  EXPECT_THROW_WITH(make_router(o), "sample_topk must be in 0..k (2), got 3");
}

TEST(Router, CapacityDroppingMatchesBruteForce) {
  at::Tensor logits = random_logits(20, 4, 3);
  logits.select(1, 0) += 2.0;  // most rows prefer expert 0, so it overflows
  for (int64_t k : {1, 2}) {
    RouterOptions o;
    o.kind = "top_k";
    o.k = k;
    o.normalize = false;
    o.capacity_factor = 1.0;
    Routing r = route(o, logits);
    const int64_t capacity = static_cast<int64_t>(std::ceil(1.0 * 20 * k / 4));
    std::vector<int64_t> fill(4, 0);
    std::vector<std::vector<double>> want(20, std::vector<double>(4, 0.0));
    int64_t dropped = 0;
    for (int64_t slot = 0; slot < k; ++slot)
      for (int64_t n = 0; n < 20; ++n) {
        auto p = softmax_row(logits, n);
        const int64_t e = ranked(p)[slot];
        if (fill[e] < capacity)
          ++fill[e], want[n][e] = p[e];
        else
          ++dropped;
      }
    EXPECT_GT(dropped, 0);
    EXPECT_EQ(r.dropped, dropped) << "k = " << k;
    EXPECT_EQ(r.requested, 20 * k);
    expect_dense_near(r.dense_weights(), want);
  }
}

TEST(Router, SwitchIsTop1WithCapacity) {
  // Six rows all preferring expert 0 of 2: capacity ceil(1.0 * 6 / 2) = 3, so rows 3..5 are dropped.
  at::Tensor logits = at::tensor({2.0f, 0.0f}).repeat({6, 1});
  RouterOptions o;
  o.kind = "switch";
  o.capacity_factor = 1.0;
  Routing r = route(o, logits);
  EXPECT_EQ(r.dropped, 3);
  at::Tensor w = r.dense_weights();
  const double p0 = 1.0 / (1.0 + std::exp(-2.0));
  for (int64_t n = 0; n < 6; ++n) EXPECT_NEAR(w[n][0].item<double>(), n < 3 ? p0 : 0.0, 1e-6);
  RoutingLog log;
  log.record("s", r, o);
  EXPECT_NEAR(log.stats()[0].dropped_fraction, 0.5, 1e-12);
}

TEST(Router, ExpertChoiceMatchesBruteForce) {
  at::Tensor logits = random_logits(12, 3, 4);
  RouterOptions o;
  o.kind = "expert_choice";
  Routing r = route(o, logits);
  const int64_t c = 4;  // ceil(1.0 * 12 / 3)
  std::vector<std::vector<double>> want(12, std::vector<double>(3, 0.0));
  for (int64_t e = 0; e < 3; ++e) {
    std::vector<std::pair<double, int64_t>> col;
    for (int64_t n = 0; n < 12; ++n) col.push_back({softmax_row(logits, n)[e], n});
    std::sort(col.begin(), col.end(), [](auto a, auto b) { return a.first > b.first; });
    for (int64_t j = 0; j < c; ++j) want[col[j].second][e] = col[j].first;
  }
  expect_dense_near(r.dense_weights(), want);
  int64_t untaken = 0;
  for (const auto& row : want)
    untaken += std::all_of(row.begin(), row.end(), [](double v) { return v == 0.0; });
  EXPECT_EQ(r.dropped, untaken);
  RouterInput causal;
  causal.causal = true;
  EXPECT_THROW_WITH(route(o, logits, causal), "[router] expert-choice", "causal decoder", "top_k or switch");
}

TEST(Router, HashIsAFixedFunctionOfTheToken) {
  at::Tensor ids = at::tensor({5, 17, 5, 1000, 3}, at::kLong);
  RouterOptions o;
  o.kind = "hash";
  RouterInput in;
  in.token_ids = ids;
  Routing r = make_router(o)->route(at::Tensor(), 4, in);
  for (int64_t n = 0; n < 5; ++n) {
    const uint64_t h = (static_cast<uint64_t>(ids[n].item<int64_t>()) * 2654435761ULL) & 0xffffffffULL;
    EXPECT_EQ(r.expert[n].item<int64_t>(), static_cast<int64_t>(h % 4));
    EXPECT_EQ(r.weight[n].item<float>(), 1.0f);
  }
  EXPECT_EQ(r.expert[0].item<int64_t>(), r.expert[2].item<int64_t>());
  EXPECT_THROW_WITH(make_router(o)->route(at::Tensor(), 4, {}), "[router] hash routing needs the token ids");
}

TEST(Router, GumbelStraightThrough) {
  at::Tensor logits = random_logits(9, 4, 5).requires_grad_(true);
  RouterOptions o;
  o.kind = "gumbel";
  Routing eval = route(o, logits);
  EXPECT_TRUE(at::equal(eval.expert, logits.argmax(-1)));
  RouterInput train;
  train.training = true;
  at::manual_seed(0);
  Routing r = route(o, logits, train);
  EXPECT_TRUE(at::allclose(r.weight, at::ones_like(r.weight)));  // one-hot in the forward pass
  (r.weight * at::arange(9, at::kFloat)).sum().backward();
  EXPECT_GT(logits.grad().abs().sum().item<double>(), 0.0);  // the relaxed sample's gradient
}

TEST(Router, InvalidOptionsAreRefused) {
  RouterOptions o;
  o.kind = "best";
  EXPECT_THROW_WITH(make_router(o), "[router] unknown router kind 'best'", "top_k");
  o.kind = "hash";
  o.level = "example";
  EXPECT_THROW_WITH(make_router(o), "hash routing hashes token ids");
  o = RouterOptions();
  o.k = 5;
  EXPECT_THROW_WITH(route(o, random_logits(2, 4, 0)), "k = 5 but only 4 experts");
  o = RouterOptions();
  o.level = "layer";
  EXPECT_THROW_WITH(make_router(o), "level 'layer' is unknown");
}

TEST(RoutingLosses, LoadBalancingEqualsFormula) {
  at::Tensor probs = at::tensor({0.7, 0.3, 0.4, 0.6}, at::kDouble).view({2, 2});
  // f = chosen / N, P = mean probs = (0.55, 0.45); loss = E * sum f P.
  EXPECT_NEAR(load_balancing_loss(probs, at::tensor({1.0, 1.0})).item<double>(),
              2 * (0.5 * 0.55 + 0.5 * 0.45), 1e-12);
  EXPECT_NEAR(load_balancing_loss(probs, at::tensor({2.0, 0.0})).item<double>(), 2 * 0.55, 1e-12);
}

TEST(RoutingLosses, ZLossAndEntropyEqualFormula) {
  at::Tensor logits = at::tensor({1.0f, 2.0f, 0.0f, 0.0f}).view({2, 2});
  const double l1 = std::log(std::exp(1.0) + std::exp(2.0)), l2 = std::log(2.0);
  EXPECT_NEAR(router_z_loss(logits).item<double>(), (l1 * l1 + l2 * l2) / 2, 1e-5);
  EXPECT_NEAR(routing_entropy(at::full({3, 4}, 0.25)), std::log(4.0), 1e-12);
}

TEST(RoutingLog, RecordsStatsAndWeightsLosses) {
  at::Tensor logits = random_logits(16, 4, 6).requires_grad_(true);
  RouterOptions o;
  o.load_balancing_coef = 0.5;
  o.z_loss_coef = 0.1;
  Routing r = route(o, logits);
  RoutingLog log;
  log.record("layers.0.mlp", r, o);
  log.record("layers.1.mlp", r, o);
  const double lb = load_balancing_loss(r.probs, r.chosen).item<double>();
  const double z = router_z_loss(logits).item<double>();
  EXPECT_NEAR(log.aux_loss().item<double>(), 2 * (0.5 * lb + 0.1 * z), 1e-5);
  log.aux_loss().backward();
  EXPECT_GT(logits.grad().abs().sum().item<double>(), 0.0);
  const auto& s = log.stats()[0];
  EXPECT_NEAR(std::accumulate(s.load.begin(), s.load.end(), 0.0), 1.0, 1e-9);
  EXPECT_NE(log.to_string().find("layers.1.mlp"), std::string::npos);
}

// Dispatch equals a loop over tokens and their experts, in values and gradients.
TEST(Dispatch, EqualsPerTokenLoop) {
  const int64_t N = 23, C = 8, E = 5;
  auto gen = at::detail::createCPUGenerator(7);
  at::Tensor W = at::randn({E, C, C}, gen, at::kDouble).requires_grad_(true);
  at::Tensor x = at::randn({N, C}, gen, at::kDouble);
  RouterOptions o;
  o.k = 2;
  o.capacity_factor = 1.0;
  Routing r = route(o, random_logits(N, E, 8));
  at::Tensor fast = dispatch(x, r, C, [&](int64_t e, const at::Tensor& rows) { return rows.mm(W[e]); });
  at::Tensor slow = at::zeros({N, C}, at::kDouble);
  for (int64_t m = 0; m < r.row.numel(); ++m) {
    const int64_t n = r.row[m].item<int64_t>(), e = r.expert[m].item<int64_t>();
    slow[n] += r.weight[m].item<double>() * x[n].unsqueeze(0).mm(W[e])[0];
  }
  EXPECT_TRUE(at::allclose(fast, slow, 1e-6, 1e-9));
  at::Tensor g1 = torch::autograd::grad({fast.sum()}, {W})[0];
  at::Tensor g2 = torch::autograd::grad({slow.sum()}, {W})[0];
  EXPECT_TRUE(at::allclose(g1, g2, 1e-6, 1e-9));
}

TEST(Routing, ExampleLevelDecidesOncePerExample) {
  const int64_t B = 3, T = 4, C = 6, E = 4;
  at::Tensor x = at::randn({B, T, C});
  at::Tensor gate = at::randn({E, C});
  RouterOptions o;
  o.level = "example";
  auto router = make_router(o);
  RoutingLog log;
  ForwardContext ctx;
  ctx.routing_log = &log;
  ForwardContextGuard guard(ctx);
  Routing r = route_tokens(
      *router, "site", "k", x, E, [&](const at::Tensor& rows) { return rows.mm(gate.t()); }, at::Tensor(),
      false);
  at::Tensor w = r.dense_weights().view({B, T, E});
  Routing per_example = router->route(x.mean(1).mm(gate.t()), E, {});
  for (int64_t t = 0; t < T; ++t) EXPECT_TRUE(at::allclose(w.select(1, t), per_example.dense_weights()));
  EXPECT_EQ(log.stats().size(), 1u);
}

TEST(Routing, SharedDecisionIsReused) {
  at::Tensor gate = at::randn({4, 6});
  RouterOptions o;
  o.shared = true;
  auto router = make_router(o);
  RoutingLog log;
  ForwardContext ctx;
  ctx.routing_log = &log;
  ForwardContextGuard guard(ctx);
  auto g = [&](const at::Tensor& rows) { return rows.mm(gate.t()); };
  Routing first = route_tokens(*router, "layer0", "moe", at::randn({2, 3, 6}), 4, g, at::Tensor(), false);
  Routing second = route_tokens(*router, "layer1", "moe", at::randn({2, 3, 6}), 4, g, at::Tensor(), false);
  EXPECT_TRUE(at::equal(first.expert, second.expert));
}

TEST(Routing, TaskLevelNeedsTaskIds) {
  RouterOptions o;
  o.level = "task";
  o.k = 1;
  auto router = make_router(o);
  at::Tensor table = at::tensor({5.0f, 0.0f, 0.0f, 5.0f}).view({2, 2});
  auto none = [](const at::Tensor& rows) { return rows; };
  EXPECT_THROW_WITH(route_tokens(*router, "s", "k", at::randn({2, 3, 4}), 2, none, table, false),
                    "routes by task: pass task ids");
  RoutingContext rc;
  rc.task_ids = at::tensor({1, 0}, at::kLong);
  ForwardContext ctx;
  ctx.routing = &rc;
  ForwardContextGuard guard(ctx);
  Routing r = route_tokens(*router, "s", "k", at::randn({2, 3, 4}), 2, none, table, false);
  at::Tensor w = r.dense_weights().view({2, 3, 2});
  EXPECT_GT(w[0][0][1].item<double>(), 0.9);  // example 0 is task 1 -> expert 1
  EXPECT_GT(w[1][2][0].item<double>(), 0.9);
  rc.task_ids = at::tensor({2, 0}, at::kLong);
  EXPECT_THROW_WITH(route_tokens(*router, "s", "k", at::randn({2, 3, 4}), 2, none, table, false),
                    "task id 2 out of range");
}

// ModuleFormer's mutual-information loss H(e|x) - H(e): 0 for a uniform router, -log E (its minimum) for
// a balanced one-hot one, and in between for a soft or an unbalanced router; H(e) is the usage entropy.
TEST(RoutingLosses, MutualInformationIsZeroUniformAndMinusLogEBalancedOneHot) {
  const int64_t E = 4;
  const at::Tensor uniform = at::full({8, E}, 1.0 / E);
  EXPECT_NEAR(mutual_information_loss(uniform).item<double>(), 0.0, 1e-6);
  const at::Tensor one_hot = at::eye(E).repeat({2, 1});  // every expert chosen by 2 of 8 rows, surely
  EXPECT_NEAR(mutual_information_loss(one_hot).item<double>(), -std::log(static_cast<double>(E)), 1e-6);
  EXPECT_NEAR(usage_entropy(one_hot).item<double>(), std::log(static_cast<double>(E)), 1e-6);
  at::Tensor collapsed = at::zeros({8, E});
  collapsed.select(1, 0).fill_(1);  // one expert for every row: sharp but unbalanced
  EXPECT_NEAR(mutual_information_loss(collapsed).item<double>(), 0.0, 1e-6);
  EXPECT_NEAR(usage_entropy(collapsed).item<double>(), 0.0, 1e-6);
  at::Tensor logits = at::randn({8, E}).requires_grad_(true);
  const at::Tensor mi = mutual_information_loss(at::softmax(logits, -1));
  EXPECT_GT(mi.item<double>(), -std::log(static_cast<double>(E)));
  EXPECT_LT(mi.item<double>(), 1e-6);
  mi.backward();
  EXPECT_GT(logits.grad().abs().sum().item<double>(), 0.0);
  EXPECT_THROW_WITH(mutual_information_loss(at::ones({8})), "router probabilities must be (N, E)");
}

// The routing log adds the mutual-information loss and the usage entropy with their coefficients, and
// reports H(e) per site.
TEST(RoutingLog, AddsTheMutualInformationAndConcentrationLosses) {
  RouterOptions o;
  o.kind = "softmax";
  o.mi_loss_coef = 0.1;
  o.concentration_coef = 0.01;
  at::manual_seed(9);
  const at::Tensor logits = at::randn({16, 4});
  const Routing r = make_router(o)->route(logits, 4, RouterInput());
  RoutingLog log;
  log.record("site", r, o);
  const at::Tensor p = at::softmax(logits, -1);
  const double want =
      0.1 * mutual_information_loss(p).item<double>() + 0.01 * usage_entropy(p).item<double>();
  EXPECT_NEAR(log.aux_loss().item<double>(), want, 1e-6);
  EXPECT_NEAR(log.stats()[0].usage_entropy, usage_entropy(p).item<double>(), 1e-6);
  EXPECT_NE(log.to_string().find("H(e|x)"), std::string::npos);
  o.mi_loss_coef = -1;
  EXPECT_THROW_WITH(make_router(o), "mi_loss_coef and concentration_coef must be >= 0");
}

}  // namespace
}  // namespace mdl
