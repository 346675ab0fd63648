// Data with known modular structure (Mittal, Bengio and Lajoie, 2022; their code's data.py): every sample
// follows one of R rules and says which, so whether a model's modules specialise by rule can be measured
// (routing/specialisation.h). Infinite: a fresh batch per call, from the generator's own seeded stream;
// the rules' coefficients come from the data seed.
//   MLP  c ~ U{0..R-1} (or a given prior), a, b ~ N(0, 1), y = alpha_c a + beta_c b (regression) or
//        1[y >= 0] (classification); input [a, b, onehot(c)]; out of distribution a, b are doubled
//   MHA  a sequence of L tokens x_n in R^{4R} (4 features per rule: search 1, search 2, retrieve 1, retrieve
//   2)
//        with a rule c_n each: rule r finds s_n = argmin_{i != n} |x_{n,s1(r)} - x_{i,s1(r)}| and s'_n
//        likewise on s2(r); y_n = alpha_c x_{s_n, r1(r)} + beta_c x_{s'_n, r2(r)}; input [x_n, onehot(c_n)]
//   RNN  rule-switching linear dynamics: s_t = sum_{o=1..order} A_{c_t,o} s_{t-o} + B_{c_t} x_t, x_t ~ N(0,
//   I),
//        A_r ~ N(0, 1) / sqrt(order dim), B_r ~ N(0, 1) / sqrt(dim); input [x_t, onehot(c_t)], target s_t
#pragma once

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace mdl {

/// One batch of rule data.
struct RuleBatch {
  at::Tensor input;   ///< MLP (N, 2 + R); MHA (N, L, 4R + R); RNN (N, L, dim + R)
  at::Tensor target;  ///< MLP (N, 1); MHA (N, L, 1); RNN (N, L, dim)
  at::Tensor rule;    ///< MLP (N); MHA and RNN (N, L) int64: the rule of each sample or step
};

/// Settings of a generator.
struct RuleDataOptions {
  std::string task = "mlp";     ///< mlp | mha | rnn
  int64_t rules = 4;            ///< R
  bool classification = false;  ///< MLP and MHA: the sign of y instead of y
  int64_t length = 10;          ///< MHA and RNN: sequence length
  int64_t dim = 1;              ///< RNN: state and input size
  int64_t order = 1;            ///< RNN: how many past states each step reads
  uint64_t data_seed = 0;       ///< the rules' coefficients
  uint64_t sample_seed = 1;     ///< the samples' stream
};

/// An infinite, seeded source of rule data.
class RuleData {
 public:
  explicit RuleData(const RuleDataOptions& options);
  /// `n` fresh samples; `scale` multiplies the inputs' free variables (2: out of distribution); `prior`
  /// (R) draws the rules (undefined: uniform).
  RuleBatch sample(int64_t n, double scale = 1.0, const at::Tensor& prior = {});
  const RuleDataOptions& options() const { return options_; }
  /// The per-rule coefficients: MLP and MHA alpha and beta (R); RNN A (R, order, dim, dim) and B (R, dim,
  /// dim).
  at::Tensor alpha, beta, A, B;

 private:
  at::Tensor draw_rules(int64_t count, const at::Tensor& prior);
  RuleDataOptions options_;
  at::Generator gen_;
};

}  // namespace mdl
