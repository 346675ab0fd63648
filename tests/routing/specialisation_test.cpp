// The specialisation metrics on cases worked out by hand: uniform routing (the random baseline), the
// identity and a permuted identity (perfect specialisation), everything collapsed onto one module, and a
// 2 x 2 case computed term by term; more modules than rules; bad inputs refused.
#include "mdl/routing/specialisation.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "test_util.h"

namespace mdl {
namespace {

/// N samples per rule, each with routing `row(r)`.
std::pair<at::Tensor, at::Tensor> samples(int64_t R, int64_t per_rule,
                                          const std::function<at::Tensor(int64_t)>& row) {
  std::vector<at::Tensor> p, r;
  for (int64_t rule = 0; rule < R; ++rule)
    for (int64_t i = 0; i < per_rule; ++i)
      p.push_back(row(rule)), r.push_back(at::full({1}, rule, at::kLong));
  return {at::stack(p), at::cat(r)};
}

TEST(Specialisation, HandComputedCases) {
  const int64_t R = 4;
  // Uniform routing: no collapse, no information, alignment (R-1)/R.
  auto [up, ur] = samples(R, 3, [&](int64_t) { return at::full({R}, 0.25, at::kDouble); });
  SpecialisationMetrics u = specialisation(up, ur, R);
  EXPECT_NEAR(u.collapse_avg, 0.0, 1e-12);
  EXPECT_NEAR(u.collapse_worst, 0.0, 1e-12);
  EXPECT_NEAR(u.inverse_mi, 1.0, 1e-6);
  EXPECT_NEAR(u.alignment, 0.75, 1e-12);
  const SpecialisationMetrics baseline = random_routing(R, R);
  EXPECT_NEAR(baseline.alignment, u.alignment, 1e-12);
  EXPECT_NEAR(baseline.adaptation, u.adaptation, 1e-12);
  // The identity and a permutation of it: every metric 0.
  for (const std::vector<int64_t>& perm :
       {std::vector<int64_t>{0, 1, 2, 3}, std::vector<int64_t>{2, 0, 3, 1}}) {
    auto [p, r] = samples(R, 2, [&](int64_t rule) {
      return at::one_hot(at::tensor({perm[rule]}, at::kLong), R)[0].to(at::kDouble);
    });
    const SpecialisationMetrics m = specialisation(p, r, R);
    EXPECT_NEAR(m.collapse_avg, 0.0, 1e-12);
    EXPECT_NEAR(m.collapse_worst, 0.0, 1e-12);
    EXPECT_NEAR(m.inverse_mi, 0.0, 1e-6);
    EXPECT_NEAR(m.alignment, 0.0, 1e-12);
    EXPECT_NEAR(m.adaptation, 0.0, 1e-12);
  }
  // Collapsed onto module 0: collapse 1, no information, alignment (R-1)/R; adaptation 1 - E[max of a
  // Dirichlet(1,1,1,1) draw] = 1 - (1 + 1/2 + 1/3 + 1/4) / 4 over the 100 draws.
  auto [cp, cr] = samples(
      R, 2, [&](int64_t) { return at::one_hot(at::tensor({int64_t{0}}, at::kLong), R)[0].to(at::kDouble); });
  const SpecialisationMetrics c = specialisation(cp, cr, R);
  EXPECT_NEAR(c.collapse_avg, 1.0, 1e-12);
  EXPECT_NEAR(c.collapse_worst, 1.0, 1e-12);
  EXPECT_NEAR(c.inverse_mi, 1.0, 1e-6);
  EXPECT_NEAR(c.alignment, 0.75, 1e-12);
  EXPECT_NEAR(c.adaptation, 1 - (1 + 0.5 + 1.0 / 3 + 0.25) / 4, 0.03);
  // 2 rules, 2 modules: rule 0 routes (0.8, 0.2), rule 1 (0.4, 0.6).
  auto [hp, hr] = samples(2, 5, [&](int64_t rule) {
    return rule == 0 ? at::tensor({0.8, 0.2}, at::kDouble) : at::tensor({0.4, 0.6}, at::kDouble);
  });
  const SpecialisationMetrics h = specialisation(hp, hr, 2);
  EXPECT_NEAR(h.collapse_avg, 0.2, 1e-12);    // 2 x (0.5 - 0.4)
  EXPECT_NEAR(h.collapse_worst, 0.2, 1e-12);  // 1 - 2 x 0.4
  const double mi = 0.4 * std::log(0.4 / 0.3 + 1e-8) + 0.1 * std::log(0.1 / 0.2 + 1e-8) +
                    0.2 * std::log(0.2 / 0.3 + 1e-8) + 0.3 * std::log(0.3 / 0.2 + 1e-8);
  EXPECT_NEAR(h.inverse_mi, (std::log(2.0) - mi) / std::log(2.0), 1e-6);
  EXPECT_NEAR(h.alignment, (0.2 + 0.2 + 0.4 + 0.4) / 4, 1e-12);  // the identity assignment
  nlohmann::json j = h;
  EXPECT_EQ(j["rules"], 2);
  EXPECT_NEAR(j["alignment"].get<double>(), 0.3, 1e-12);
}

TEST(Specialisation, MoreModulesThanRulesAndBadInputs) {
  // 2 rules each on its own module of 4: perfectly specialised (inverse MI 0, alignment 0); two modules
  // unused: collapse.
  auto p = at::tensor({1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0}, at::kDouble).view({2, 4});
  const SpecialisationMetrics m = specialisation(p, at::tensor({0, 1}, at::kLong), 2);
  EXPECT_NEAR(m.inverse_mi, 0.0, 1e-6);
  EXPECT_NEAR(m.alignment, 0.0, 1e-12);
  EXPECT_NEAR(m.collapse_avg, 4.0 / 3.0 * 0.5, 1e-12);  // modules 2 and 3 miss 1/4 each
  EXPECT_NEAR(m.collapse_worst, 1.0, 1e-12);
  EXPECT_EQ(m.modules, 4);
  EXPECT_THROW_WITH(specialisation(p, at::tensor({0, 2}, at::kLong), 2), "rules must lie in 0..1");
  EXPECT_THROW_WITH(specialisation(p, at::tensor({0}, at::kLong), 2), "probs must be (N, M) and rules (N)");
  EXPECT_THROW_WITH(specialisation(-p, at::tensor({0, 1}, at::kLong), 2), "must be finite and >= 0");
  EXPECT_THROW_WITH(specialisation(at::zeros({2, 3})), "the routing is all zeros");
}

}  // namespace
}  // namespace mdl
