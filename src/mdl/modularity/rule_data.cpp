#include "mdl/modularity/rule_data.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

#include "mdl/core/error.h"

namespace mdl {

RuleData::RuleData(const RuleDataOptions& o)
    : options_(o), gen_(at::detail::createCPUGenerator(o.sample_seed)) {
  MDL_CHECK(o.task == "mlp" || o.task == "mha" || o.task == "rnn", "[rule-data] task '", o.task,
            "' is unknown; expected mlp, mha or rnn");
  MDL_CHECK(o.rules >= 1 && o.length >= 2 && o.dim >= 1 && o.order >= 1, "[rule-data] needs rules >= 1, ",
            "length >= 2, dim >= 1, order >= 1; got ", o.rules, ", ", o.length, ", ", o.dim, ", ", o.order);
  auto coefficients = at::detail::createCPUGenerator(o.data_seed);
  const int64_t R = o.rules;
  if (o.task == "rnn") {
    A = at::randn({R, o.order, o.dim, o.dim}, coefficients, at::kFloat) / std::sqrt(double(o.order * o.dim));
    B = at::randn({R, o.dim, o.dim}, coefficients, at::kFloat) / std::sqrt(double(o.dim));
  } else {
    alpha = at::randn({R}, coefficients, at::kFloat);
    beta = at::randn({R}, coefficients, at::kFloat);
  }
}

at::Tensor RuleData::draw_rules(int64_t count, const at::Tensor& prior) {
  const int64_t R = options_.rules;
  if (!prior.defined()) return at::randint(0, R, {count}, gen_, at::kLong);
  MDL_CHECK(prior.dim() == 1 && prior.size(0) == R && (prior >= 0).all().item<bool>() &&
                prior.sum().item<double>() > 0,
            "[rule-data] the rule prior must be (", R, ") non-negative weights, got ", prior.sizes());
  return at::multinomial(prior.to(at::kFloat), count, /*replacement=*/true, gen_);
}

RuleBatch RuleData::sample(int64_t n, double scale, const at::Tensor& prior) {
  MDL_CHECK(n >= 1, "[rule-data] a batch needs n >= 1 samples, got ", n);
  const RuleDataOptions& o = options_;
  const int64_t R = o.rules;
  RuleBatch b;
  if (o.task == "mlp") {
    b.rule = draw_rules(n, prior);
    const at::Tensor ab = at::randn({n, 2}, gen_, at::kFloat) * scale;
    at::Tensor y =
        alpha.index_select(0, b.rule) * ab.select(1, 0) + beta.index_select(0, b.rule) * ab.select(1, 1);
    b.target = (o.classification ? (y >= 0).to(at::kFloat) : y).unsqueeze(1);
    b.input = at::cat({ab, at::one_hot(b.rule, R).to(at::kFloat)}, 1);
    return b;
  }
  const int64_t L = o.length;
  b.rule = draw_rules(n * L, prior).view({n, L});
  const at::Tensor onehot = at::one_hot(b.rule, R).to(at::kFloat);  // (n, L, R)
  if (o.task == "mha") {
    const at::Tensor x = at::randn({n, L, 4 * R}, gen_, at::kFloat) * scale;
    // Feature columns of each token's rule: 4r (search 1), 4r+1 (search 2), 4r+2 and 4r+3 (retrieve).
    auto column = [&](int64_t k) { return (b.rule * 4 + k).unsqueeze(-1); };  // (n, L, 1)
    auto nearest = [&](int64_t k) {  // for each n, the other token closest on the n-th token's search feature
      const at::Tensor mine = x.gather(2, column(k));  // (n, L, 1)
      const at::Tensor all =
          x.gather(2, column(k).transpose(1, 2).expand({n, L, L}));  // [b, i, n] = x_{i, s(r_n)}
      at::Tensor d = (all.transpose(1, 2) - mine).abs();             // [b, n, i]
      d = d + at::eye(L, x.options()).unsqueeze(0) * 1e30;           // i != n
      return d.argmin(2);                                            // (n, L)
    };
    const at::Tensor s = nearest(0), s2 = nearest(1);
    auto retrieve = [&](const at::Tensor& from, int64_t k) {  // x_{from_n, k-th retrieve feature of r_n}
      const at::Tensor rows =
          x.gather(1, from.unsqueeze(-1).expand({n, L, 4 * R}));  // (n, L, 4R): token from_n
      return rows.gather(2, column(k)).squeeze(-1);
    };
    at::Tensor y = alpha.index_select(0, b.rule.reshape({-1})).view({n, L}) * retrieve(s, 2) +
                   beta.index_select(0, b.rule.reshape({-1})).view({n, L}) * retrieve(s2, 3);
    b.target = (o.classification ? (y >= 0).to(at::kFloat) : y).unsqueeze(-1);
    b.input = at::cat({x, onehot}, 2);
    return b;
  }
  // RNN
  const int64_t D = o.dim;
  const at::Tensor x = at::randn({n, L, D}, gen_, at::kFloat) * scale;
  std::vector<at::Tensor> states;
  for (int64_t t = 0; t < L; ++t) {
    const at::Tensor r = b.rule.select(1, t);
    at::Tensor s = at::matmul(B.index_select(0, r), x.select(1, t).unsqueeze(-1)).squeeze(-1);  // (n, D)
    for (int64_t k = 1; k <= o.order && t - k >= 0; ++k) {
      const at::Tensor Ak = A.select(1, k - 1).index_select(0, r);  // (n, D, D)
      s = s + at::matmul(Ak, states[t - k].unsqueeze(-1)).squeeze(-1);
    }
    states.push_back(s);
  }
  b.target = at::stack(states, 1);
  b.input = at::cat({x, onehot}, 2);
  return b;
}

}  // namespace mdl
