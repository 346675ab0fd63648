#include "mdl/ops/spatial_kernel.h"

#include <ATen/ATen.h>

#include "mdl/core/error.h"

namespace mdl::fn {

at::Tensor truncated_kernel(const at::Tensor& a, const at::Tensor& b, double bandwidth, double epsilon) {
  MDL_CHECK(a.dim() >= 2 && b.dim() >= 2 && a.size(-1) == b.size(-1), "[kernel] expects (..., M, d) and ",
            "(..., N, d) points of one space, got ", a.sizes(), " and ", b.sizes());
  MDL_CHECK(bandwidth > 0 && epsilon >= 0 && epsilon < 1, "[kernel] bandwidth must be > 0 and epsilon in ",
            "[0, 1), got ", bandwidth, " and ", epsilon);
  const at::Tensor d2 = (a.unsqueeze(-2) - b.unsqueeze(-3)).pow(2).sum(-1);  // (..., M, N)
  const at::Tensor k = at::exp(-d2 / bandwidth);
  return k.masked_fill(k < epsilon, 0.0);
}

}  // namespace mdl::fn
