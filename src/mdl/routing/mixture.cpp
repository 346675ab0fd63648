#include "mdl/routing/mixture.h"

#include <ATen/ATen.h>

#include <vector>

#include "mdl/core/error.h"
#include "mdl/core/forward_context.h"
#include "mdl/routing/routing_context.h"
#include "mdl/routing/routing_log.h"

namespace mdl {

Routing route_tokens(const Router& router, const std::string& site, const std::string& shared_key,
                     const at::Tensor& x, int64_t experts, const GateFn& gate, const at::Tensor& task_logits,
                     bool training) {
  MDL_CHECK(x.dim() == 3, "[routing] '", site, "' routes (B, T, C) inputs, got ", x.sizes());
  const ForwardContext& ctx = ForwardContext::current();
  const RouterOptions& o = router.options();
  const int64_t B = x.size(0), T = x.size(1);
  if (o.shared && ctx.routing_log)
    if (const Routing* r = ctx.routing_log->shared(shared_key)) {
      MDL_CHECK(r->rows == B * T && r->experts == experts, "[routing] '", site, "' shares the decision of '",
                shared_key, "' but has ", experts, " experts and ", B * T, " tokens, not ", r->experts,
                " and ", r->rows);
      return *r;
    }
  RouterInput in;
  in.causal = ctx.causal;
  in.training = training;
  Routing r;
  if (o.level == "token") {
    if (!router.uses_logits()) {
      MDL_CHECK(ctx.input_ids && ctx.input_ids->defined() && ctx.input_ids->numel() == B * T, "[routing] '",
                site, "': hash routing needs the token ids of the ", B * T,
                " tokens at this site (no prompt-tuning tokens)");
      in.token_ids = ctx.input_ids->reshape({-1});
      r = router.route(at::Tensor(), experts, in);
    } else {
      r = router.route(gate(x.reshape({B * T, x.size(2)})), experts, in);
    }
  } else if (o.level == "example") {
    in.causal = false;  // one decision per example from the whole example
    MDL_CHECK(!ctx.causal || ctx.past == 0, "[routing] '", site,
              "': example-level routing decides from the whole "
              "prompt; during cached decoding reuse the prompt's decision (set shared) or route per token");
    r = expand_rows(router.route(gate(x.mean(1)), experts, in), T);
  } else {  // task
    MDL_CHECK(task_logits.defined(), "[routing] '", site, "' has no per-task logits for task-level routing");
    const at::Tensor& ids = current_task_ids(site, B, task_logits.size(0));
    in.causal = false;
    r = expand_rows(router.route(task_logits.index_select(0, ids.to(task_logits.device())), experts, in), T);
  }
  if (o.shared && ctx.routing_log) ctx.routing_log->set_shared(shared_key, r);
  if (ctx.routing_log) ctx.routing_log->record(site, r, o);
  return r;
}

at::Tensor dispatch(const at::Tensor& x, const Routing& r, int64_t out_features, const ExpertFn& expert) {
  return dispatch_with_rows(x, r, out_features, [&](int64_t e, const at::Tensor& rows, const at::Tensor&) {
    return expert(e, rows);
  });
}

at::Tensor dispatch_with_rows(const at::Tensor& x, const Routing& r, int64_t out_features,
                              const ExpertRowsFn& expert) {
  MDL_CHECK(x.dim() == 2 && x.size(0) == r.rows, "[dispatch] inputs must be (", r.rows, ", C), got ",
            x.sizes());
  at::Tensor out = at::zeros({x.size(0), out_features}, x.options());
  if (r.expert.numel() == 0) return out;
  // Group the assignments by expert (stable: rows stay in order within an expert).
  auto sorted = at::sort(r.expert, /*stable=*/true, 0, false);
  const at::Tensor& order = std::get<1>(sorted);
  at::Tensor rows = r.row.index_select(0, order);                            // (M)
  at::Tensor weights = r.weight.index_select(0, order).to(x.scalar_type());  // (M)
  at::Tensor counts = at::bincount(r.expert, {}, r.experts).to(at::kCPU);
  at::Tensor xs = x.index_select(0, rows);  // (M, C), grouped by expert
  // One split (its backward is one cat) rather than a narrow per expert (each narrow's backward would
  // write a zero-filled (M, C) gradient).
  std::vector<int64_t> sizes(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + r.experts);
  std::vector<at::Tensor> blocks = xs.split_with_sizes(sizes, 0);
  std::vector<at::Tensor> row_ids = rows.split_with_sizes(sizes, 0);
  std::vector<at::Tensor> ys;
  for (int64_t e = 0; e < r.experts; ++e) {
    const int64_t n = sizes[static_cast<size_t>(e)];
    if (n == 0) continue;
    at::Tensor y = expert(e, blocks[static_cast<size_t>(e)], row_ids[static_cast<size_t>(e)]);
    MDL_CHECK(y.dim() == 2 && y.size(0) == n && y.size(1) == out_features, "[dispatch] expert ", e,
              " returned ", y.sizes(), " for ", n, " rows; expected (", n, ", ", out_features, ")");
    ys.push_back(y);
  }
  at::Tensor y = ys.size() == 1 ? ys[0] : at::cat(ys, 0);  // (M, out)
  return out.index_add(0, rows, y * weights.unsqueeze(1));
}

}  // namespace mdl
