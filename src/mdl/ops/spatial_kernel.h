// The truncated Gaussian kernel of S2RMs (Rahaman et al., 2021): how strongly two points of the modules'
// embedding space interact, exactly zero beyond a distance, so that far modules and views never meet.
#pragma once

#include <ATen/core/Tensor.h>

namespace mdl::fn {

/// a (..., M, d), b (..., N, d) (broadcast over the leading axes) -> K (..., M, N):
/// K = exp(-||a_m - b_n||^2 / bandwidth), set to exactly 0 where it is below `epsilon` (so log K is -inf
/// there and attention weighted by it ignores the pair). bandwidth > 0, epsilon in [0, 1).
at::Tensor truncated_kernel(const at::Tensor& a, const at::Tensor& b, double bandwidth, double epsilon);

}  // namespace mdl::fn
