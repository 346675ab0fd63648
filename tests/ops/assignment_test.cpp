// The Hungarian method against brute force over every assignment, on square and rectangular matrices
// (more columns or more rows), minimising and maximising; bad costs are refused.
#include "mdl/ops/assignment.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <numeric>

#include "test_util.h"

namespace mdl {
namespace {

/// The least total cost over every injective map of the smaller side into the larger.
double brute_force(const at::Tensor& c) {
  const int64_t n = c.size(0), m = c.size(1);
  const bool rows_first = n <= m;
  const int64_t small = std::min(n, m), big = std::max(n, m);
  std::vector<int64_t> cols(big);
  std::iota(cols.begin(), cols.end(), 0);
  double best = std::numeric_limits<double>::infinity();
  do {  // every permutation of the big side; its first `small` entries are the map
    double total = 0;
    for (int64_t i = 0; i < small; ++i)
      total += rows_first ? c[i][cols[i]].item<double>() : c[cols[i]][i].item<double>();
    best = std::min(best, total);
  } while (std::next_permutation(cols.begin(), cols.end()));
  return best;
}

double total(const at::Tensor& c, const std::vector<int64_t>& to) {
  double t = 0;
  for (size_t i = 0; i < to.size(); ++i)
    if (to[i] >= 0) t += c[static_cast<int64_t>(i)][to[i]].item<double>();
  return t;
}

TEST(Assignment, HungarianEqualsBruteForce) {
  auto gen = at::detail::createCPUGenerator(3);
  for (const auto& [n, m] : std::vector<std::pair<int64_t, int64_t>>{
           {1, 1}, {3, 3}, {5, 5}, {6, 6}, {2, 5}, {3, 6}, {5, 2}, {6, 3}, {4, 7}})
    for (int trial = 0; trial < 5; ++trial) {
      const at::Tensor c = at::rand({n, m}, gen, at::kDouble) * 10 - 3;
      const std::vector<int64_t> to = fn::min_cost_assignment(c);
      ASSERT_EQ(static_cast<int64_t>(to.size()), n);
      std::vector<int64_t> used;
      for (int64_t j : to)
        if (j >= 0) used.push_back(j);
      EXPECT_EQ(static_cast<int64_t>(used.size()), std::min(n, m)) << n << "x" << m;
      std::sort(used.begin(), used.end());
      EXPECT_TRUE(std::adjacent_find(used.begin(), used.end()) == used.end()) << "a column used twice";
      EXPECT_NEAR(total(c, to), brute_force(c), 1e-9) << n << "x" << m << " trial " << trial;
      // Maximising a score is minimising its negation.
      const std::vector<int64_t> best = fn::max_sum_assignment(c);
      EXPECT_NEAR(total(c, best), -brute_force(-c), 1e-9) << n << "x" << m;
    }
  // Ties and a known answer: the anti-diagonal is the only zero-cost assignment.
  const at::Tensor anti = 1 - at::eye(4, at::kDouble).flip(1);
  EXPECT_EQ(fn::min_cost_assignment(anti), (std::vector<int64_t>{3, 2, 1, 0}));
  EXPECT_THROW_WITH(fn::min_cost_assignment(at::zeros({0, 3})), "[assignment] costs must be a non-empty");
  at::Tensor bad = at::zeros({2, 2});
  bad[0][1] = std::numeric_limits<double>::quiet_NaN();
  EXPECT_THROW_WITH(fn::min_cost_assignment(bad), "[assignment] costs must be finite");
}

}  // namespace
}  // namespace mdl
