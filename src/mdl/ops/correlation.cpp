#include "mdl/ops/correlation.h"

#include <ATen/ATen.h>

#include "mdl/core/error.h"

namespace mdl::fn {

at::Tensor pearson_correlation(const at::Tensor& a, const at::Tensor& b) {
  MDL_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0),
            "[correlation] expects (N, p) and (N, q) ", "observations of the same rows, got ", a.sizes(),
            " and ", b.sizes());
  MDL_CHECK(a.size(0) >= 2, "[correlation] needs at least 2 observations, got ", a.size(0));
  at::Tensor x = a.to(at::kDouble), y = b.to(at::kDouble);
  x = x - x.mean(0, true);                                                    // (N, p)
  y = y - y.mean(0, true);                                                    // (N, q)
  const at::Tensor nx = x.norm(2, {0}), ny = y.norm(2, {0});                  // (p), (q)
  at::Tensor r = at::matmul(x.t(), y) / at::outer(nx, ny).clamp_min(1e-300);  // (p, q)
  // A constant column has no direction: 0, not NaN (0 / 0).
  r = at::where((nx > 0).unsqueeze(1) & (ny > 0).unsqueeze(0), r, at::zeros_like(r));
  return r.clamp(-1.0, 1.0);
}

}  // namespace mdl::fn
