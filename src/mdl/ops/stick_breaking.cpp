#include "mdl/ops/stick_breaking.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <vector>

#include "mdl/core/error.h"

namespace mdl::fn {

at::Tensor stick_breaking_weights(const at::Tensor& q, const at::Tensor& k, const at::Tensor& key_mask) {
  MDL_CHECK(q.dim() >= 4 && k.dim() == q.dim() && q.size(0) == k.size(0) && q.size(-1) == k.size(-1),
            "[stick-breaking] q must be (B, H, T, D) and k (B, H, S, D), got ", q.sizes(), " and ",
            k.sizes());
  for (int64_t d = 1; d + 2 < q.dim(); ++d)
    MDL_CHECK(q.size(d) == k.size(d) || k.size(d) == 1, "[stick-breaking] k's dimension ", d, " (", k.size(d),
              ") must equal q's (", q.size(d), ") or be 1 (shared), got q ", q.sizes(), " and k ", k.sizes());
  const int64_t B = q.size(0), T = q.size(-2), S = k.size(-2), D = q.size(-1);
  std::vector<int64_t> grid(static_cast<size_t>(q.dim()), 1);  // (1, ..., 1, T, S)
  grid[grid.size() - 2] = T, grid.back() = S;
  std::vector<int64_t> keys(static_cast<size_t>(q.dim()), 1);  // (B, 1, ..., 1, S)
  keys.front() = B, keys.back() = S;
  MDL_CHECK(S >= T, "[stick-breaking] ", T, " queries need at least as many keys, got ", S);
  at::Tensor l = at::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(D));  // (B, H, T, S)
  // Key j is visible to query i when j <= S - T + i, and real.
  const auto opts = at::TensorOptions().dtype(at::kLong).device(q.device());
  at::Tensor visible =
      at::arange(S, opts).view({1, S}) <= (at::arange(T, opts) + (S - T)).view({T, 1});  // (T, S)
  visible = visible.view(grid);
  if (key_mask.defined()) {
    MDL_CHECK(key_mask.dim() == 2 && key_mask.size(0) == B && key_mask.size(1) == S,
              "[stick-breaking] key_mask must be (", B, ", ", S, "), got ", key_mask.sizes());
    visible = visible.logical_and(key_mask.to(q.device()).to(at::kBool).view(keys));
  }
  at::Tensor log_z =
      at::log_sigmoid(l).masked_fill(visible.logical_not(), -std::numeric_limits<double>::infinity());
  at::Tensor log_beta =
      at::log_sigmoid(-l).masked_fill(visible.logical_not(), 0.0);  // invisible keys break nothing
  // sum_{t > j} log beta_it: the reverse cumulative sum over keys, less the key's own term.
  at::Tensor after = log_beta.flip(-1).cumsum(-1).flip(-1) - log_beta;
  return at::exp(log_z + after);
}

at::Tensor stick_breaking_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& key_mask, at::Tensor* remainder) {
  MDL_CHECK(v.dim() == k.dim() && v.size(-2) == k.size(-2), "[stick-breaking] v must be (B, H, S, D) like k ",
            k.sizes(), ", got ", v.sizes());
  at::Tensor a = stick_breaking_weights(q, k, key_mask);  // (B, H, T, S)
  if (remainder) *remainder = 1 - a.sum(-1);
  return at::matmul(a.to(v.scalar_type()), v);
}

}  // namespace mdl::fn
