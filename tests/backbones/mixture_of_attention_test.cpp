// ModuleFormer's mixture of attention heads against a per-token loop written here: each token's top-k
// experts by the gate's softmax (not renormalised), each expert's own queries attending by stick-breaking
// (the product form) over the shared keys and values of the tokens at or before it, its own output
// projection, weighted by the gate, summed. And every parameter learns.
#include "mdl/backbones/mixture_of_attention.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/utils.h>

#include <cmath>

#include "test_util.h"

namespace mdl {
namespace {

TEST(MixtureOfAttention, EqualsAPerTokenLoop) {
  MoaOptions o;
  o.experts = 4;
  o.k = 2;
  o.heads = 2;
  o.att_hidden = 8;
  MixtureOfAttention moa("layer0.moa", 6, o, 3, at::kDouble);
  moa->eval();
  torch::NoGradGuard g;
  for (auto& p : moa->parameters()) p.normal_(0.0, 0.5);
  at::manual_seed(2);
  const at::Tensor x = at::randn({2, 5, 6}, at::kDouble);
  const at::Tensor got = moa->forward(x);
  const int64_t D = o.att_hidden / o.heads;
  const at::Tensor K = at::linear(x, moa->k_w, moa->k_b), V = at::linear(x, moa->v_w, moa->v_b);  // (B, T, A)
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t t = 0; t < 5; ++t) {
      const at::Tensor p = at::softmax(moa->gate->scores(x[b][t].unsqueeze(0)), -1)[0];
      auto [w, experts] = p.topk(2);
      at::Tensor want = at::zeros({6}, at::kDouble);
      for (int64_t j = 0; j < 2; ++j) {
        const int64_t e = experts[j].item<int64_t>();
        const at::Tensor q = at::mv(moa->q_w[e], x[b][t]);  // (A)
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
        want += w[j].item<double>() * at::mv(moa->o_w[e], y);
      }
      EXPECT_CLOSE(got[b][t], want, 1e-6) << b << "," << t;  // routers' probabilities are float32
    }
}

TEST(MixtureOfAttention, EveryParameterLearnsAndBadSettingsAreRefused) {
  MoaOptions o;
  o.experts = 3;
  o.k = 2;
  o.att_hidden = 8;
  MixtureOfAttention moa("moa", 6, o, 4, at::kFloat);
  at::Tensor mask = at::ones({2, 7}, at::kLong);
  mask[1].narrow(0, 0, 2).fill_(0);  // left padding
  moa->forward(at::randn({2, 7, 6}), mask).pow(2).sum().backward();
  for (const auto& p : moa->named_parameters())
    EXPECT_GT(p.value().grad().abs().sum().item<double>(), 0.0) << p.key();
  o.k = 4;
  EXPECT_THROW_WITH(MixtureOfAttention("moa", 6, o, 4, at::kFloat), "[moa] needs 1 <= k <= experts");
}

}  // namespace
}  // namespace mdl
