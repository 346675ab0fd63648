#include "mdl/aggregation/aggregator.h"

#include <ATen/ATen.h>

#include <vector>

#include "mdl/core/error.h"
#include "mdl/core/forward_context.h"
#include "mdl/routing/mixture.h"
#include "mdl/routing/module_routing.h"

namespace mdl {

at::Tensor example_weights(const Routing& r, int64_t B, int64_t T) {
  if (r.head_dense.defined()) {
    MDL_CHECK(r.head_dense.size(0) == B, "[aggregate] per-head weights for ", r.head_dense.size(0),
              " examples, batch ", B);
    return r.head_dense;
  }
  at::Tensor w = r.dense_weights();  // (rows, E)
  if (r.rows == B * T && T > 1) w = w.view({B, T, r.experts}).select(1, 0);
  MDL_CHECK(w.size(0) == B, "[aggregate] a routing of ", r.rows, " rows is neither per example (", B,
            ") nor per token (", B * T, ")");
  return w.unsqueeze(1);
}

at::Tensor WeightedSum::combine(const at::Tensor& input, const at::Tensor& current, const Routing& routing,
                                const GroupMembers& m) {
  MDL_CHECK(input.dim() == 3, "[aggregate] a weighted sum routes (B, T, C) inputs, got ", input.sizes());
  const int64_t B = input.size(0), T = input.size(1), in = input.size(2), out = m.out_features;
  const Routing r = routing.rows == B * T ? routing : expand_rows(routing, T);
  // With a routing context, a member run on some tokens sees the context of those tokens' examples (task
  // ids, module lists, token ids): each token is one example of length 1 to it. Without one there is
  // nothing per example to narrow (a hash router inside a member then refuses the batch's token ids), and
  // a backbone's expert MLP pays nothing.
  const ForwardContext& ctx = ForwardContext::current();
  const bool narrow = ctx.routing != nullptr;
  auto on_rows = [&](int64_t e, const at::Tensor& x, const at::Tensor& h, const at::Tensor& row_ids) {
    if (!narrow) return m.change(e, x, h);
    RowsContext rows(row_ids, T);
    return m.change(e, x, h);
  };
  at::Tensor y;
  if (!m.reads_current) {
    y = dispatch_with_rows(input.reshape({B * T, in}), r, out,
                           [&](int64_t e, const at::Tensor& x, const at::Tensor& ids) {
                             return on_rows(e, x, at::Tensor(), ids);
                           });
  } else {
    MDL_CHECK(current.defined(), "[aggregate] these members read the current output, and there is none here");
    // Each token's row carries its input and current output, so a member sees both for its rows only.
    at::Tensor rows =
        at::cat({input.reshape({B * T, in}).to(current.scalar_type()), current.reshape({B * T, out})}, 1);
    y = dispatch_with_rows(rows, r, out, [&](int64_t e, const at::Tensor& block, const at::Tensor& ids) {
      at::Tensor x = block.narrow(1, 0, in).unsqueeze(1),
                 h = block.narrow(1, in, out).unsqueeze(1);  // (n, 1, .)
      return on_rows(e, x.to(input.scalar_type()), h, ids).squeeze(1);
    });
  }
  if (keep_weights_) last_weights_ = r.dense_weights().detach().view({B, T, m.count});
  return y.view({B, T, out});
}

namespace {

/// Every member's change on the whole batch, stacked: (..., N, C).
at::Tensor all_changes(const at::Tensor& input, const at::Tensor& current, const GroupMembers& m) {
  std::vector<at::Tensor> changes;
  for (int64_t e = 0; e < m.count; ++e) changes.push_back(m.change(e, input, current));
  return at::stack(changes, -2);
}

}  // namespace

AttentionFusion::AttentionFusion(int64_t C, double t, at::Generator& gen, c10::TensorOptions dtype)
    : temperature(t) {
  query = at::empty({C, C}).normal_(0.0, 0.02, gen).to(dtype);
  key = at::empty({C, C}).normal_(0.0, 0.02, gen).to(dtype);
  value = at::eye(C).to(dtype);
}

void AttentionFusion::register_parameters(torch::nn::Module& owner) {
  query = owner.register_parameter("query", query);
  key = owner.register_parameter("key", key);
  value = owner.register_parameter("value", value);
}

at::Tensor AttentionFusion::combine(const at::Tensor& input, const at::Tensor& current, const Routing&,
                                    const GroupMembers& m) {
  at::Tensor o = all_changes(input, current, m);                  // (..., N, C)
  at::Tensor h = current.to(o.scalar_type());                     // (..., C)
  at::Tensor q = at::matmul(h, query.t()).unsqueeze(-2);          // (..., 1, C)
  at::Tensor k = at::matmul(o, key.t());                          // (..., N, C)
  at::Tensor a = at::softmax((q * k).sum(-1) / temperature, -1);  // (..., N)
  if (keep_weights_) last_weights_ = a.detach();
  return (a.unsqueeze(-1) * at::matmul(o, value.t())).sum(-2);
}

GateFusion::GateFusion(int64_t N, int64_t C, c10::TensorOptions dtype) {
  weight = at::zeros({N, C}).to(dtype);
  bias = at::zeros({N}).to(dtype);
}

void GateFusion::register_parameters(torch::nn::Module& owner) {
  weight = owner.register_parameter("gate_weight", weight);
  bias = owner.register_parameter("gate_bias", bias);
}

at::Tensor GateFusion::combine(const at::Tensor& input, const at::Tensor& current, const Routing&,
                               const GroupMembers& m) {
  at::Tensor o = all_changes(input, current, m);  // (..., N, C)
  at::Tensor h = current.to(o.scalar_type());
  at::Tensor g = at::sigmoid(at::matmul(h, weight.t()) + bias);  // (..., N)
  if (keep_weights_) last_weights_ = g.detach();
  return (g.unsqueeze(-1) * o).sum(-2);
}

std::pair<at::Tensor, at::Tensor> ParameterAverage::average(const at::Tensor& A, const at::Tensor& B,
                                                            const at::Tensor& w) const {
  const int64_t E = A.size(0), r = A.size(1), in = A.size(2), out = B.size(1), h = heads_, Bn = w.size(0);
  MDL_CHECK(w.dim() == 3 && w.size(1) == h && w.size(2) == E, "[aggregate] parameter averaging of ", E,
            " members over ", h, " heads needs weights (B, ", h, ", ", E, "), got ", w.sizes());
  at::Tensor wa = w.to(A.scalar_type());
  // Head j of A covers input columns [j in/h, (j+1) in/h); head j of B covers output rows likewise.
  at::Tensor a = at::einsum("bhs,srhd->brhd", {wa, A.view({E, r, h, in / h})}).reshape({Bn, r, in});
  at::Tensor b = at::einsum("bhs,shor->bhor", {wa, B.view({E, h, out / h, r})}).reshape({Bn, out, r});
  return {a, b};
}

at::Tensor ParameterAverage::combine(const at::Tensor& input, const at::Tensor&, const Routing& routing,
                                     const GroupMembers& m) {
  MDL_CHECK(input.dim() == 3, "[aggregate] parameter averaging runs on (B, T, C) inputs, got ",
            input.sizes());
  at::Tensor A, B;
  double scaling = 1.0;
  MDL_CHECK(m.stacked_low_rank && m.stacked_low_rank(A, B, scaling),
            "[aggregate] parameter averaging needs members that "
            "are LoRAs of one rank and scaling (their factors are averaged); average representations with a "
            "weighted sum");
  at::Tensor w = example_weights(routing, input.size(0), input.size(1));  // (B, heads, E)
  if (keep_weights_) last_weights_ = w.detach().mean(1).unsqueeze(1).expand({-1, input.size(1), -1});
  auto [a, b] = average(A, B, w);
  at::Tensor x = input.to(A.scalar_type());
  return at::bmm(at::bmm(x, a.transpose(1, 2)), b.transpose(1, 2)) * scaling;  // (B, T, out)
}

}  // namespace mdl
