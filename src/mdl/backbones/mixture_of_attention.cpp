#include "mdl/backbones/mixture_of_attention.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "mdl/core/error.h"
#include "mdl/ops/stick_breaking.h"
#include "mdl/routing/mixture.h"

namespace mdl {

RouterOptions moduleformer_router(int64_t k, int64_t sample_topk) {
  RouterOptions top_k;
  top_k.kind = "top_k";
  top_k.k = k;
  top_k.normalize = false;
  top_k.sample_topk = sample_topk;
  return top_k;
}

MixtureOfAttentionImpl::MixtureOfAttentionImpl(const std::string& site, int64_t C, const MoaOptions& o,
                                               uint64_t seed, c10::TensorOptions dtype)
    : options(o), site_(site) {
  MDL_CHECK(o.experts >= 1 && o.heads >= 1 && o.att_hidden % o.heads == 0, "[moa] '", site,
            "' needs experts >= 1 and heads dividing att_hidden, got experts ", o.experts, ", heads ",
            o.heads, ", att_hidden ", o.att_hidden);
  MDL_CHECK(o.router.kind != "top_k" || (o.router.k >= 1 && o.router.k <= o.experts), "[moa] '", site,
            "' needs 1 <= k <= experts, got k ", o.router.k, ", experts ", o.experts);
  check_scores_tokens("the attention experts at '" + site + "'", o.router);
  auto gen = at::detail::createCPUGenerator(seed);
  auto normal = [&](std::vector<int64_t> shape) {
    return at::empty(shape).normal_(0.0, 0.02, gen).to(dtype);
  };
  const int64_t E = o.experts, A = o.att_hidden;
  auto experts = register_module("experts", std::make_shared<torch::nn::Module>("experts"));
  auto outputs = register_module("output_experts", std::make_shared<torch::nn::Module>("output_experts"));
  q_w = experts->register_parameter("weight", normal({E, C, A}));
  o_w = outputs->register_parameter("weight", normal({E, A, C}));
  gate = register_module("gate", Gate(o.gate, C, E, seed + 1, dtype));
  router_ = std::make_shared<LearnedRouter>(site, site, o.router,
                                            [g = gate](const at::Tensor& rows) { return g->scores(rows); });
}

void MixtureOfAttentionImpl::set_router(const RouterOptions& o) {
  check_scores_tokens("the attention experts at '" + site_ + "'", o);
  router_->set_options(o);
  options.router = o;
}

at::Tensor MixtureOfAttentionImpl::forward(const at::Tensor& x, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& key_mask) {
  MDL_CHECK(x.dim() == 3, "[moa] '", site_, "' expects (B, T, C) inputs, got ", x.sizes());
  const int64_t B = x.size(0), T = x.size(1), C = x.size(2), N = B * T;
  const int64_t H = options.heads, A = options.att_hidden, D = A / H;
  MDL_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes(),
            "[moa] '", site_, "': keys and values must be (", B, ", ", H, ", S, ", D, "), got ", k.sizes(),
            " and ", v.sizes());
  const Routing r = router_->route(x, options.experts, is_training());  // N token rows
  const int64_t M = r.row.numel();                                      // assignments
  if (M == 0) return at::zeros_like(x);
  // Each assignment is a row of its own for the grouped dispatch: its expert's queries, unweighted.
  Routing per_assignment;
  per_assignment.rows = M;
  per_assignment.experts = options.experts;
  per_assignment.row = at::arange(M, r.row.options());
  per_assignment.expert = r.expert;
  per_assignment.weight = at::ones({M}, x.options());
  const at::Tensor q = dispatch(x.reshape({N, C}).index_select(0, r.row), per_assignment, A,
                                [&](int64_t e, const at::Tensor& rows) { return at::matmul(rows, q_w[e]); });
  // The slot of each assignment among its token's: 0 for its first, 1 for its second...
  const at::Tensor order = std::get<1>(r.row.sort());
  const at::Tensor counts = at::bincount(r.row, {}, N);  // (N)
  const at::Tensor starts = counts.cumsum(0) - counts;   // first sorted index per token
  const at::Tensor slot_sorted =
      at::arange(M, r.row.options()) - starts.index_select(0, r.row.index_select(0, order));
  const at::Tensor slot = at::empty_like(r.row).index_put_({order}, slot_sorted);
  const int64_t K = counts.max().item<int64_t>();
  // Queries by slot (B, K, H, T, D), zeros where a token has fewer than K experts; keys and values shared.
  at::Tensor slots = at::zeros({K, N, A}, q.options());
  slots.index_put_({slot, r.row}, q);
  slots = slots.view({K, B, T, H, D}).permute({1, 0, 3, 2, 4});
  at::Tensor y =
      fn::stick_breaking_attention(slots, k.unsqueeze(1), v.unsqueeze(1), key_mask);  // (B,K,H,T,D)
  y = y.permute({1, 0, 3, 2, 4}).reshape({K, N, A}).index({slot, r.row});             // (M, A)
  per_assignment.weight = r.weight.to(x.scalar_type());  // each expert's output projection, weighted
  at::Tensor out = dispatch(y, per_assignment, C,
                            [&](int64_t e, const at::Tensor& rows) { return at::matmul(rows, o_w[e]); });
  return at::zeros({N, C}, x.options()).index_add(0, r.row, out).view({B, T, C});  // slots summed per token
}

}  // namespace mdl
