// ModuleFormer's mixture of attention heads against a per-token loop written here: each token's top-k
// experts by the gate's softmax (not renormalised), each expert's own queries attending by stick-breaking
// (the product form) over the shared keys and values of the tokens at or before it, its own output
// projection, weighted by the gate, summed; the same under routers that give tokens different numbers of
// experts (softmax over all, expert choice, capacity drops), and with a KV cache. And every parameter
// learns.
#include "mdl/backbones/mixture_of_attention.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/utils.h>

#include <cmath>

#include "mdl/ops/stick_breaking.h"
#include "test_util.h"

namespace mdl {
namespace {

/// Shared keys and values (B, T, A) of x, and as heads (B, H, T, D).
struct Shared {
  at::Tensor K, V, k, v;
  Shared(const at::Tensor& x, int64_t H, uint64_t seed) {
    auto gen = at::detail::createCPUGenerator(seed);
    const int64_t A = 8, C = x.size(2), B = x.size(0), T = x.size(1);
    const at::Tensor wk = at::randn({A, C}, gen, at::kDouble), wv = at::randn({A, C}, gen, at::kDouble);
    K = at::matmul(x, wk.t()), V = at::matmul(x, wv.t());
    k = K.view({B, T, H, A / H}).transpose(1, 2), v = V.view({B, T, H, A / H}).transpose(1, 2);
  }
};

TEST(MixtureOfAttention, EqualsAPerTokenLoop) {
  MoaOptions o;
  o.experts = 4;
  o.heads = 2;
  o.att_hidden = 8;
  MixtureOfAttention moa("layer0.moa", 6, o, 3, at::kDouble);
  moa->eval();
  torch::NoGradGuard g;
  for (auto& p : moa->parameters()) p.normal_(0.0, 0.5);
  at::manual_seed(2);
  const at::Tensor x = at::randn({2, 5, 6}, at::kDouble);
  const Shared kv(x, o.heads, 7);
  const at::Tensor got = moa->forward(x, kv.k, kv.v);
  const int64_t D = o.att_hidden / o.heads;
  const at::Tensor &K = kv.K, &V = kv.V;  // (B, T, A)
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t t = 0; t < 5; ++t) {
      const at::Tensor p = at::softmax(moa->gate->scores(x[b][t].unsqueeze(0)), -1)[0];
      auto [w, experts] = p.topk(2);
      at::Tensor want = at::zeros({6}, at::kDouble);
      for (int64_t j = 0; j < 2; ++j) {
        const int64_t e = experts[j].item<int64_t>();
        const at::Tensor q = at::mv(moa->q_w[e].t(), x[b][t]);  // (A)
        at::Tensor y = at::zeros({o.att_hidden}, at::kDouble);
        for (int64_t h = 0; h < o.heads; ++h) {
          const at::Tensor qh = q.narrow(0, h * D, D);
          auto z = [&](int64_t s) {
            const double l =
                (qh * K[b][s].narrow(0, h * D, D)).sum().item<double>() / std::sqrt(static_cast<double>(D));
            return 1.0 / (1.0 + std::exp(-l));
          };
          for (int64_t s = 0; s <= t; ++s) {
            double a = z(s);
            for (int64_t u = s + 1; u <= t; ++u) a *= 1 - z(u);
            y.narrow(0, h * D, D).add_(V[b][s].narrow(0, h * D, D) * a);
          }
        }
        want += w[j].item<double>() * at::mv(moa->o_w[e].t(), y);
      }
      EXPECT_CLOSE(got[b][t], want, 1e-10) << b << "," << t;
    }
}

// Any policy: each token's routed experts, whatever their number, against the sum over a dense weight
// matrix (every expert's full output, weighted by the routing's dense weights), and the last tokens from a
// cache equal to the whole sequence at once.
TEST(MixtureOfAttention, AnyRouterAndACacheEqualTheDenseSum) {
  MoaOptions o;
  o.experts = 3;
  o.att_hidden = 8;
  for (const std::string kind : {"softmax", "top_k", "switch"}) {
    RouterOptions r;
    r.kind = kind;
    r.k = 2;
    r.capacity_factor = kind == "switch" ? 0.5 : 0.0;  // drops tokens: they take no expert
    o.router = r;
    MixtureOfAttention moa("moa", 6, o, 5, at::kDouble);
    moa->eval();
    torch::NoGradGuard g;
    for (auto& p : moa->parameters()) p.normal_(0.0, 0.5);
    at::manual_seed(3);
    const at::Tensor x = at::randn({2, 6, 6}, at::kDouble);
    const Shared kv(x, o.heads, 8);
    const at::Tensor got = moa->forward(x, kv.k, kv.v);
    // Every expert on every token, then the routing's weights.
    const Routing routing = make_router(r)->route(moa->gate->scores(x.reshape({12, 6})), 3, RouterInput{});
    const at::Tensor dense = routing.dense_weights();  // (N, E)
    at::Tensor want = at::zeros({12, 6}, at::kDouble);
    const int64_t D = 4;
    for (int64_t e = 0; e < 3; ++e) {
      at::Tensor q = at::matmul(x, moa->q_w[e]).view({2, 6, 2, D}).transpose(1, 2);
      at::Tensor y = fn::stick_breaking_attention(q, kv.k, kv.v, {}).transpose(1, 2).reshape({12, 8});
      want += dense.select(1, e).unsqueeze(1) * at::matmul(y, moa->o_w[e]);
    }
    EXPECT_CLOSE(got.reshape({12, 6}), want, 1e-10) << kind;
    if (kind == "switch") continue;  // capacity depends on the number of tokens routed together
    // The last 2 tokens with the first 4 cached: keys and values of all 6, queries of 2.
    const at::Tensor tail = moa->forward(x.narrow(1, 4, 2), kv.k, kv.v);
    EXPECT_CLOSE(tail, got.narrow(1, 4, 2), 1e-10) << kind;
  }
}

TEST(MixtureOfAttention, EveryParameterLearnsAndBadSettingsAreRefused) {
  MoaOptions o;
  o.experts = 3;
  o.att_hidden = 8;
  MixtureOfAttention moa("moa", 6, o, 4, at::kFloat);
  at::Tensor mask = at::ones({2, 7}, at::kLong);
  mask[1].narrow(0, 0, 2).fill_(0);  // left padding
  const at::Tensor x = at::randn({2, 7, 6});
  const at::Tensor k = at::randn({2, 2, 7, 4}).requires_grad_(), v = at::randn({2, 2, 7, 4}).requires_grad_();
  moa->forward(x, k, v, mask).pow(2).sum().backward();
  for (const auto& p : moa->named_parameters())
    EXPECT_GT(p.value().grad().abs().sum().item<double>(), 0.0) << p.key();
  EXPECT_GT(k.grad().abs().sum().item<double>(), 0.0);
  EXPECT_GT(v.grad().abs().sum().item<double>(), 0.0);
  EXPECT_THROW_WITH(moa->forward(x, k.narrow(1, 0, 1), v, mask),
                    "[moa] 'moa': keys and values must be (2, 2, S, 4)");
  RouterOptions task;
  task.level = "task";
  EXPECT_THROW_WITH(moa->set_router(task), "task-level routing needs per-task logits");
  o.router.k = 4;
  EXPECT_THROW_WITH(MixtureOfAttention("moa", 6, o, 4, at::kFloat), "[moa] 'moa' needs 1 <= k <= experts");
}

}  // namespace
}  // namespace mdl
