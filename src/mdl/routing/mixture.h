// A mixture step at one site, shared by every mixture in mdl (Mixtral's sparse MLP, mixtures of LoRAs,
// upcycled and MoEfied models): route the tokens (Algorithm 1's first step, at the router's level), then
// dispatch each expert's rows to it as one contiguous block and sum the weighted results (compute and
// aggregate). Never a loop over tokens: assignments are sorted by expert, each expert runs one call on
// its block, and the results are scattered back with one index_add.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>

#include "mdl/routing/router.h"

namespace mdl {

/// Expert `e` applied to its rows (n, C) -> (n, out).
using ExpertFn = std::function<at::Tensor(int64_t e, const at::Tensor& rows)>;
/// Expert `e` applied to its rows (n, C), given their indices (n) among the rows of the dispatch -> (n, out).
using ExpertRowsFn = std::function<at::Tensor(int64_t e, const at::Tensor& rows, const at::Tensor& row_ids)>;
/// Router logits for rows (R, C) -> (R, E).
using GateFn = std::function<at::Tensor(const at::Tensor& rows)>;

/// Routes the B*T tokens of `x` (B, T, C) over `experts` experts. Level token: logits = gate(tokens);
/// example: gate(mean of each example's tokens), one decision per example; task: `task_logits`
/// (n_tasks, E) at the forward context's task ids. With options.shared, the first call under
/// `shared_key` in a forward decides for all later ones. Records the routing under `site` in the forward
/// context's routing log, if any.
Routing route_tokens(const Router& router, const std::string& site, const std::string& shared_key,
                     const at::Tensor& x, int64_t experts, const GateFn& gate, const at::Tensor& task_logits,
                     bool training);

/// out (N, out_features) = sum over assignments of weight * expert(x[row]); `x` is (N, C).
at::Tensor dispatch(const at::Tensor& x, const Routing& routing, int64_t out_features,
                    const ExpertFn& expert);
/// The same, each expert also given its rows' indices (to narrow the forward context to them).
at::Tensor dispatch_with_rows(const at::Tensor& x, const Routing& routing, int64_t out_features,
                              const ExpertRowsFn& expert);

}  // namespace mdl
