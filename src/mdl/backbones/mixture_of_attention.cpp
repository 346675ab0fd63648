#include "mdl/backbones/mixture_of_attention.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "mdl/core/error.h"
#include "mdl/ops/stick_breaking.h"
#include "mdl/routing/mixture.h"

namespace mdl {

MixtureOfAttentionImpl::MixtureOfAttentionImpl(const std::string& site, int64_t C, const MoaOptions& o,
                                               uint64_t seed, c10::TensorOptions dtype)
    : options(o) {
  MDL_CHECK(o.experts >= 1 && o.k >= 1 && o.k <= o.experts && o.heads >= 1 && o.att_hidden % o.heads == 0,
            "[moa] needs 1 <= k <= experts and heads dividing att_hidden, got k ", o.k, ", experts ",
            o.experts, ", heads ", o.heads, ", att_hidden ", o.att_hidden);
  auto gen = at::detail::createCPUGenerator(seed);
  auto normal = [&](std::vector<int64_t> shape) {
    return at::empty(shape).normal_(0.0, 0.02, gen).to(dtype);
  };
  const int64_t E = o.experts, A = o.att_hidden;
  q_w = register_parameter("q_proj", normal({E, A, C}));
  o_w = register_parameter("o_proj", normal({E, C, A}));
  k_w = register_parameter("k_proj_weight", normal({A, C}));
  k_b = register_parameter("k_proj_bias", at::zeros({A}).to(dtype));
  v_w = register_parameter("v_proj_weight", normal({A, C}));
  v_b = register_parameter("v_proj_bias", at::zeros({A}).to(dtype));
  gate = register_module("gate", Gate(o.gate, C, E, seed + 1, dtype));
  RouterOptions top_k;  // ModuleFormer: the top-k probabilities, not renormalised
  top_k.k = o.k;
  top_k.normalize = false;
  router_ = std::make_shared<LearnedRouter>(site, site, top_k,
                                            [g = gate](const at::Tensor& rows) { return g->scores(rows); });
}

at::Tensor MixtureOfAttentionImpl::forward(const at::Tensor& x, const at::Tensor& key_mask) {
  MDL_CHECK(x.dim() == 3, "[moa] expects (B, T, C) inputs, got ", x.sizes());
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), N = B * T;
  const int64_t k = options.k, H = options.heads, A = options.att_hidden, D = A / H;
  const Routing r = router_->route(x, options.experts, is_training());
  MDL_CHECK(r.dropped == 0 && r.row.numel() == k * N, "[moa] every token takes exactly k experts");
  // Assignments are slot-major (all tokens' first choice, then all second ones): m = slot * N + token.
  // Each assignment is a row of its own for the grouped dispatch (each expert once on its rows).
  Routing per_assignment;
  per_assignment.rows = k * N;
  per_assignment.experts = options.experts;
  per_assignment.row = at::arange(k * N, r.row.options());
  per_assignment.expert = r.expert;
  per_assignment.weight = at::ones({k * N}, x.options());
  at::Tensor q = dispatch(x.reshape({N, C}).index_select(0, r.row), per_assignment, A,
                          [&](int64_t e, const at::Tensor& rows) { return at::matmul(rows, q_w[e].t()); });
  // The k slots as extra heads over shared keys and values: q (B, k H, T, D), K and V (B, k H, T, D).
  q = q.view({k, B, T, H, D}).permute({1, 0, 3, 2, 4}).reshape({B, k * H, T, D});
  auto shared = [&](const at::Tensor& w, const at::Tensor& b) {
    return at::linear(x, w, b).view({B, T, H, D}).transpose(1, 2).repeat({1, k, 1, 1});
  };
  at::Tensor y =
      fn::stick_breaking_attention(q, shared(k_w, k_b), shared(v_w, v_b), key_mask);  // (B, k H, T, D)
  y = y.view({B, k, H, T, D}).permute({1, 0, 3, 2, 4}).reshape({k * N, A});           // (m, A)
  per_assignment.weight =
      r.weight.to(x.scalar_type());  // each expert's output projection, weighted by its gate
  at::Tensor out = dispatch(y, per_assignment, C,
                            [&](int64_t e, const at::Tensor& rows) { return at::matmul(rows, o_w[e].t()); });
  out = at::zeros({N, C}, x.options()).index_add(0, r.row, out);  // the k slots of each token summed
  return out.view({B, T, C});
}

}  // namespace mdl
