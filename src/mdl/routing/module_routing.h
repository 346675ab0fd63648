// Fixed routing of a site's modules, and the dispatch that follows it (Algorithm 1 when the route is
// known before the forward: the active modules with their scales, each example's own list, a task's or a
// language's table). For every row, the modules it uses in the order they apply, with their weights.
//
// Modules map the site's current output to a new one, so the aggregation is the order itself: each row's
// modules apply one after the other, current += weight * (module(x, current) - current). Additive modules
// (LoRA: a change that does not depend on current) therefore sum, and adapters stack in the row's order
// (MAD-X: the language adapter, then the task adapter on its output).
//
// Kept on the host: it is small, decided before the forward, and the dispatch gathers rows by it without a
// device round trip. Learned routers (router.h) produce a `Routing` of tensors instead.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

#include "mdl/core/forward_context.h"
#include "mdl/routing/routing_context.h"

namespace mdl {

/// Which modules (by index) each row uses, in order, with weights.
struct ModuleRouting {
  using Choice = std::pair<int64_t, double>;  ///< (module index, weight)
  int64_t rows = 0;
  /// Every row's list when all rows share one (routing by active modules); else per_row holds one per row.
  std::vector<Choice> shared;
  std::vector<std::vector<Choice>> per_row;

  /// Every row uses `choices`.
  static ModuleRouting same_for_all(int64_t rows, std::vector<Choice> choices);
  /// Row b uses `per_row[b]`.
  static ModuleRouting per_example(std::vector<std::vector<Choice>> per_row);
  bool is_shared() const { return per_row.empty(); }
  const std::vector<Choice>& of(int64_t row) const {
    return is_shared() ? shared : per_row[static_cast<size_t>(row)];
  }
  /// The most modules any row uses (steps of the dispatch).
  size_t steps() const;
  /// Whether no row uses any module.
  bool empty() const;
};

/// While alive, the current forward context narrowed to some rows of the batch: their task and language
/// ids, token ids and module lists, so that a module run on those rows (a task-routed Polytropon, a hash
/// router over token ids, a site with per-example modules inside an expert) reads its own rows' values,
/// not the whole batch's.
class RowsContext {
 public:
  /// Examples `idx` (n, int64, repeats allowed) of the batch; `rows` the same indices on the host.
  RowsContext(const at::Tensor& idx, const std::vector<int64_t>& rows);
  /// Single tokens of a (B, T) batch as n one-token examples: token rows `tokens` (n, int64, b * T + t).
  RowsContext(const at::Tensor& tokens, int64_t T);
  RowsContext(const RowsContext&) = delete;
  RowsContext& operator=(const RowsContext&) = delete;

 private:
  ForwardContext context_;
  RoutingContext routing_;
  at::Tensor input_ids_;
  std::optional<ForwardContextGuard> guard_;
};

/// Module `module` on some rows: their inputs and current outputs (first dimension: rows) -> new outputs.
using ModuleStep =
    std::function<at::Tensor(int64_t module, const at::Tensor& input, const at::Tensor& current)>;

/// Runs the routing: step by step (each row's first module, then its second...), the rows that take the
/// same module at a step as one call on their rows, its weighted change added back. A module that every
/// row takes at one step with one weight runs on the whole batch without a gather (and, at weight 1, may
/// lengthen the sequence: a prompt). A module run on some rows sees the forward context of those rows
/// (their task, language and token ids). input (B, ...), base (B, ...).
at::Tensor dispatch_in_order(const at::Tensor& input, const at::Tensor& base, const ModuleRouting& routing,
                             const ModuleStep& step);

}  // namespace mdl
