#include "mdl/ops/assignment.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "mdl/core/error.h"

namespace mdl::fn {
namespace {

/// Rows <= columns: the potentials form of the Hungarian method (1-based, column 0 a sentinel).
std::vector<int64_t> assign_rows(const std::vector<std::vector<double>>& a, int64_t n, int64_t m) {
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> u(n + 1, 0.0), v(m + 1, 0.0);
  std::vector<int64_t> p(m + 1, 0), way(m + 1, 0);  // p[j]: the row matched to column j
  for (int64_t i = 1; i <= n; ++i) {
    p[0] = i;
    int64_t j0 = 0;
    std::vector<double> minv(m + 1, inf);
    std::vector<char> used(m + 1, 0);
    do {  // grow an alternating tree from row i until it reaches a free column
      used[j0] = 1;
      const int64_t i0 = p[j0];
      double delta = inf;
      int64_t j1 = 0;
      for (int64_t j = 1; j <= m; ++j) {
        if (used[j]) continue;
        const double cur = a[i0 - 1][j - 1] - u[i0] - v[j];
        if (cur < minv[j]) minv[j] = cur, way[j] = j0;
        if (minv[j] < delta) delta = minv[j], j1 = j;
      }
      for (int64_t j = 0; j <= m; ++j) {
        if (used[j]) {
          u[p[j]] += delta, v[j] -= delta;
        } else {
          minv[j] -= delta;
        }
      }
      j0 = j1;
    } while (p[j0] != 0);
    do {  // flip the path
      const int64_t j1 = way[j0];
      p[j0] = p[j1];
      j0 = j1;
    } while (j0 != 0);
  }
  std::vector<int64_t> col(n, -1);
  for (int64_t j = 1; j <= m; ++j)
    if (p[j] > 0) col[p[j] - 1] = j - 1;
  return col;
}

}  // namespace

std::vector<int64_t> min_cost_assignment(const at::Tensor& cost) {
  MDL_CHECK(cost.dim() == 2 && cost.size(0) > 0 && cost.size(1) > 0,
            "[assignment] costs must be a non-empty (rows, columns) matrix, got ", cost.sizes());
  const at::Tensor c = cost.detach().to(at::kCPU, at::kDouble).contiguous();
  MDL_CHECK(at::isfinite(c).all().item<bool>(), "[assignment] costs must be finite");
  const int64_t n = c.size(0), m = c.size(1);
  const bool transpose = n > m;  // the method wants rows <= columns
  const int64_t rows = transpose ? m : n, cols = transpose ? n : m;
  std::vector<std::vector<double>> a(rows, std::vector<double>(cols));
  const double* d = c.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < m; ++j) (transpose ? a[j][i] : a[i][j]) = d[i * m + j];
  const std::vector<int64_t> matched = assign_rows(a, rows, cols);
  if (!transpose) return matched;
  std::vector<int64_t> out(n, -1);
  for (int64_t j = 0; j < m; ++j)
    if (matched[j] >= 0) out[matched[j]] = j;
  return out;
}

std::vector<int64_t> max_sum_assignment(const at::Tensor& score) {
  return min_cost_assignment(-score.to(at::kDouble));
}

}  // namespace mdl::fn
