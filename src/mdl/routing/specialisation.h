// Do routed modules specialise? The metrics of Mittal, Bengio and Lajoie (2022, "Is a modular architecture
// enough?"; their code's prob.py, metrics.py, hungarian.py, spec.py), from routing probabilities p_i (M
// modules) and the true rule r_i (R rules) of each sample:
//   P[r, m] = (1/R) mean_{i: r_i = r} p_i(m), then normalised to sum 1 (a rule without samples is a zero row)
//   collapse-avg    M/(M-1) sum_m max(0, 1/M - sum_r P[r, m])   how much use is missing from rarely used
//   modules collapse-worst  1 - M min_m sum_r P[r, m]                   the least used module's shortfall
//   inverse MI      (log K - MI) / log K, K = min(R, M), MI = sum P log(P / (P_r P_m + 1e-8) + 1e-8)
//   alignment       sum |Pi - A| / (2R), A = R P (each rule's mean routing), Pi the 0/1 matrix of the
//                   assignment of rules to distinct modules that minimises sum (1 - A) (Hungarian)
//   adaptation      for 100 rule priors q ~ Dirichlet(1_R): the mean routing under that prior,
//                   s = sum_r q_r E[p | r], against q: mean of sum |sort(q) - sort(s)| / 2 (both padded with
//                   zeros to max(R, M))
// All lower is better; 0 for routing by the true rule. With M = R these are the paper's formulas (its 1/R
// and log R are 1/M and log K). Random (uniform) routing gives collapse 0, inverse MI 1 and alignment
// (R-1)/R for M = R. Adaptation is computed in expectation from the per-rule mean routing, where the
// paper's code re-runs the model on 10 batches drawn with each prior (equal in expectation; no sampling
// noise).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <nlohmann/json_fwd.hpp>

namespace mdl {

/// The metrics of one routing; lower is better.
struct SpecialisationMetrics {
  double collapse_avg = 0, collapse_worst = 0, inverse_mi = 0, alignment = 0, adaptation = 0;
  int64_t rules = 0, modules = 0;
};
void to_json(nlohmann::json& j, const SpecialisationMetrics& m);

/// E[p | r] (R, M): each rule's mean routing over its samples (zeros for a rule without samples), from
/// probabilities (N, M) and rules (N) int64 in 0..R-1.
at::Tensor mean_routing_per_rule(const at::Tensor& probs, const at::Tensor& rules, int64_t R);
/// The metrics from each rule's mean routing (R, M) (mean_routing_per_rule); `seed` draws the adaptation
/// priors.
SpecialisationMetrics specialisation(const at::Tensor& per_rule, uint64_t seed = 0);
/// The same from probabilities (N, M) and rules (N).
SpecialisationMetrics specialisation(const at::Tensor& probs, const at::Tensor& rules, int64_t R,
                                     uint64_t seed = 0);
/// What uniform routing over M modules scores on R rules (the baseline printed beside a result).
SpecialisationMetrics random_routing(int64_t R, int64_t M);

}  // namespace mdl
