// The linear assignment problem (Kuhn's Hungarian method, with potentials: O(n^2 m)): given costs (n, m),
// one distinct column per row (or one distinct row per column when there are more rows than columns)
// minimising the total cost. Used where modules are matched to rules (routing/specialisation) and hidden
// dimensions of two models to each other.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace mdl::fn {

/// For costs (n, m) (any floating dtype, finite): the column of each row, -1 for the rows left without one
/// when n > m. The assignment has min(n, m) pairs and the least total cost.
std::vector<int64_t> min_cost_assignment(const at::Tensor& cost);
/// The same, maximising the total (e.g. of correlations).
std::vector<int64_t> max_sum_assignment(const at::Tensor& score);

}  // namespace mdl::fn
