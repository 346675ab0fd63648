// Pearson correlation between the columns of two matrices of paired observations: how far each feature of
// one model follows each feature of another over the same inputs (transfer-module's alignment of hidden
// dimensions, after Klimaszewski et al.'s r_regression).
#pragma once

#include <ATen/core/Tensor.h>

namespace mdl::fn {

/// For a (N, p) and b (N, q), N >= 2 rows observed together: r (p, q), float64, r[i][j] the Pearson
/// correlation of a's column i with b's column j. A constant column correlates 0 with everything.
at::Tensor pearson_correlation(const at::Tensor& a, const at::Tensor& b);

}  // namespace mdl::fn
