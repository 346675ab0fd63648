// Stick-breaking attention against its definition written as a plain loop in float64: each query walks
// back from its own position, key j taking sigmoid(l_ij) of what the later keys left; padded keys are
// transparent; rows sum to at most 1 with the remainder reported; cached queries (S > T) sit at the end.
#include "mdl/ops/stick_breaking.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>

#include "test_util.h"

namespace mdl {
namespace {

double sigmoid(double x) {
  return 1.0 / (1.0 + std::exp(-x));
}

/// A (B, H, T, S) by the definition: A_ij = z_ij prod_{j < t <= p_i} (1 - z_it), over real keys only.
at::Tensor naive_weights(const at::Tensor& q, const at::Tensor& k, const at::Tensor& mask) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), S = k.size(2), D = q.size(3);
  at::Tensor a = at::zeros({B, H, T, S}, at::kDouble);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < T; ++i) {
        const int64_t pos = S - T + i;
        for (int64_t j = 0; j <= pos; ++j) {
          if (mask.defined() && mask[b][j].item<int64_t>() == 0) continue;
          auto z = [&](int64_t t) {
            return sigmoid((q[b][h][i] * k[b][h][t]).sum().item<double>() /
                           std::sqrt(static_cast<double>(D)));
          };
          double w = z(j);
          for (int64_t t = j + 1; t <= pos; ++t)
            if (!mask.defined() || mask[b][t].item<int64_t>() != 0) w *= 1 - z(t);
          a[b][h][i][j] = w;
        }
      }
  return a;
}

TEST(StickBreaking, EqualsTheDefinitionWithPaddingAndACache) {
  at::manual_seed(4);
  const at::Tensor q = at::randn({2, 2, 5, 4}, at::kDouble) * 2, k = at::randn({2, 2, 5, 4}, at::kDouble) * 2;
  const at::Tensor v = at::randn({2, 2, 5, 3}, at::kDouble);
  at::Tensor mask = at::ones({2, 5}, at::kLong);
  mask[1][0] = 0, mask[1][3] = 0;  // padding on the left and a hole
  at::Tensor remainder;
  const at::Tensor y = fn::stick_breaking_attention(q, k, v, mask, &remainder);
  const at::Tensor want = naive_weights(q, k, mask);
  EXPECT_CLOSE(fn::stick_breaking_weights(q, k, mask), want, 1e-12);
  EXPECT_CLOSE(y, at::matmul(want, v), 1e-12);
  EXPECT_CLOSE(remainder, 1 - want.sum(-1), 1e-12);
  EXPECT_TRUE((want.sum(-1) <= 1 + 1e-12).all().item<bool>());
  EXPECT_TRUE((remainder > 0).all().item<bool>());  // every row leaves some of its stick
  // A masked key takes nothing and breaks nothing.
  EXPECT_TRUE(
      at::equal(fn::stick_breaking_weights(q, k, mask).select(3, 3)[1], at::zeros({2, 5}, at::kDouble)));
  // Two queries after three cached keys: the last rows of the full pass.
  const at::Tensor cached = fn::stick_breaking_weights(q.narrow(2, 3, 2), k, mask);
  EXPECT_CLOSE(cached, want.narrow(2, 3, 2), 1e-12);
  EXPECT_CLOSE(cached, naive_weights(q.narrow(2, 3, 2), k, mask), 1e-12);
}

TEST(StickBreaking, FloatMatchesDoubleAndGradientsAreFinite) {
  at::manual_seed(5);
  const at::Tensor q = at::randn({1, 2, 64, 8}), k = at::randn({1, 2, 64, 8}), v = at::randn({1, 2, 64, 8});
  const at::Tensor y = fn::stick_breaking_attention(q, k, v, at::Tensor());
  const at::Tensor y64 =
      fn::stick_breaking_attention(q.to(at::kDouble), k.to(at::kDouble), v.to(at::kDouble), at::Tensor());
  EXPECT_CLOSE(y.to(at::kDouble), y64, 1e-5);
  at::Tensor qg = q.clone().requires_grad_(true), kg = k.clone().requires_grad_(true);
  at::Tensor mask = at::ones({1, 64}, at::kLong);
  mask[0].narrow(0, 0, 10).fill_(0);  // rows whose early keys are all padding
  fn::stick_breaking_attention(qg, kg, v, mask).sum().backward();
  EXPECT_TRUE(qg.grad().isfinite().all().item<bool>());
  EXPECT_TRUE(kg.grad().isfinite().all().item<bool>());
  EXPECT_GT(qg.grad().abs().sum().item<double>(), 0.0);
  EXPECT_THROW_WITH(fn::stick_breaking_attention(q, k.narrow(2, 0, 10), v.narrow(2, 0, 10), at::Tensor()),
                    "64 queries need at least as many keys, got 10");
}

}  // namespace
}  // namespace mdl
