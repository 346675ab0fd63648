#include "mdl/routing/specialisation.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>
#include <random>
#include <vector>

#include "mdl/core/error.h"
#include "mdl/ops/assignment.h"

namespace mdl {

void to_json(nlohmann::json& j, const SpecialisationMetrics& m) {
  j = {{"collapse_avg", m.collapse_avg},
       {"collapse_worst", m.collapse_worst},
       {"inverse_mi", m.inverse_mi},
       {"alignment", m.alignment},
       {"adaptation", m.adaptation},
       {"rules", m.rules},
       {"modules", m.modules}};
}

at::Tensor mean_routing_per_rule(const at::Tensor& probs, const at::Tensor& rules, int64_t R) {
  MDL_CHECK(probs.dim() == 2 && rules.dim() == 1 && rules.size(0) == probs.size(0), "[specialisation] probs ",
            "must be (N, M) and rules (N), got ", probs.sizes(), " and ", rules.sizes());
  MDL_CHECK(R >= 1 && probs.size(1) >= 1, "[specialisation] needs R >= 1 rules and M >= 1 modules, got R ", R,
            ", M ", probs.size(1));
  const at::Tensor p = probs.detach().to(at::kCPU, at::kDouble), r = rules.to(at::kCPU, at::kLong);
  MDL_CHECK(r.numel() == 0 || (r.min().item<int64_t>() >= 0 && r.max().item<int64_t>() < R),
            "[specialisation] rules must lie in 0..", R - 1, ", got ", r.min().item<int64_t>(), "..",
            r.max().item<int64_t>());
  MDL_CHECK(at::isfinite(p).all().item<bool>() && (p >= 0).all().item<bool>(),
            "[specialisation] probabilities must be finite and >= 0");
  at::Tensor sums = at::zeros({R, p.size(1)}, p.options()).index_add(0, r, p);
  at::Tensor counts = at::bincount(r, {}, R).to(at::kDouble).clamp_min(1).unsqueeze(1);
  return sums / counts;
}

SpecialisationMetrics specialisation(const at::Tensor& per_rule, uint64_t seed) {
  MDL_CHECK(per_rule.dim() == 2 && per_rule.size(0) >= 1 && per_rule.size(1) >= 1,
            "[specialisation] the per-rule mean routing must be (R, M), got ", per_rule.sizes());
  const at::Tensor mean = per_rule.detach().to(at::kCPU, at::kDouble);
  const int64_t R = mean.size(0), M = mean.size(1);
  SpecialisationMetrics out;
  out.rules = R, out.modules = M;
  const double total = mean.sum().item<double>();
  MDL_CHECK(total > 0, "[specialisation] the routing is all zeros");
  const at::Tensor P = mean / total;  // (R, M), sums to 1
  const at::Tensor use = P.sum(0);    // (M) each module's share
  const at::Tensor Pr = P.sum(1, true), Pm = P.sum(0, true);
  const double uniform = 1.0 / static_cast<double>(M);
  out.collapse_avg =
      M > 1 ? static_cast<double>(M) / (M - 1) * (uniform - use).clamp_min(0).sum().item<double>() : 0.0;
  out.collapse_worst = 1.0 - static_cast<double>(M) * use.min().item<double>();
  const double mi = (P * (P / (Pr * Pm + 1e-8) + 1e-8).log()).sum().item<double>();
  const double log_k = std::log(static_cast<double>(std::min(R, M)));
  out.inverse_mi = log_k > 0 ? (log_k - mi) / log_k : 0.0;
  // Alignment: each rule to a distinct module, by the assignment that follows the routing most.
  const at::Tensor A = P * static_cast<double>(R);
  const std::vector<int64_t> to = fn::min_cost_assignment(1.0 - A);
  at::Tensor Pi = at::zeros_like(A);
  for (int64_t r = 0; r < R; ++r)
    if (to[r] >= 0) Pi[r][to[r]] = 1.0;
  out.alignment = (Pi - A).abs().sum().item<double>() / (2.0 * R);
  // Adaptation: rule priors from Dirichlet(1_R) (normalised exponentials), as the paper's seeds 0..99.
  std::mt19937_64 rng(seed);
  std::exponential_distribution<double> exp1(1.0);
  const int64_t K = std::max(R, M);
  double adaptation = 0;
  const int draws = 100;
  for (int d = 0; d < draws; ++d) {
    std::vector<double> q(static_cast<size_t>(R));
    double sum = 0;
    for (double& x : q) sum += (x = exp1(rng));
    for (double& x : q) x /= sum;
    const at::Tensor prior = at::tensor(q, at::kDouble);
    at::Tensor s = at::matmul(prior, mean);  // (M) the mean routing under this prior
    s = s / s.sum().clamp_min(1e-300);
    std::vector<double> a(q), b(s.data_ptr<double>(), s.data_ptr<double>() + M);
    a.resize(static_cast<size_t>(K), 0.0), b.resize(static_cast<size_t>(K), 0.0);
    std::sort(a.begin(), a.end()), std::sort(b.begin(), b.end());
    double dist = 0;
    for (int64_t i = 0; i < K; ++i) dist += std::abs(a[i] - b[i]);
    adaptation += dist / 2;
  }
  out.adaptation = adaptation / draws;
  return out;
}

SpecialisationMetrics specialisation(const at::Tensor& probs, const at::Tensor& rules, int64_t R,
                                     uint64_t seed) {
  return specialisation(mean_routing_per_rule(probs, rules, R), seed);
}

SpecialisationMetrics random_routing(int64_t R, int64_t M) {
  MDL_CHECK(R >= 1 && M >= 1, "[specialisation] needs R >= 1 and M >= 1, got ", R, " and ", M);
  return specialisation(at::full({R, M}, 1.0 / static_cast<double>(M), at::kDouble));
}

}  // namespace mdl
