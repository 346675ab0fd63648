// The routing context travels with a batch (the survey's "fixed routing" inputs): task and language ids
// per example, and explicit module choices per example, so one batch can mix examples that use different
// modules. Learned routers read task ids (task-level routing, Polytropon); module lists attached at a
// site (AttachedModules) read the per-example choices.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace mdl {

/// One module an example uses, and how strongly (1 = as trained).
struct ModuleChoice {
  std::string name;
  double scale = 1.0;
};

/// Per-batch routing inputs. Every field is optional.
struct RoutingContext {
  at::Tensor task_ids;      ///< (B) int64, for task-level routers
  at::Tensor language_ids;  ///< (B) int64
  /// Per example, the modules it uses, in the order they apply (stack(a, b): a, then b on a's output);
  /// empty: every example uses the site's active modules. A name not loaded at a site is absent there.
  std::vector<std::vector<ModuleChoice>> modules;

  /// Fixed routing by id: example b uses `table[ids[b]]` (ids are task or language ids).
  static RoutingContext by_id(const at::Tensor& ids, const std::vector<std::vector<ModuleChoice>>& table,
                              bool language = false);
};

/// The running forward's task ids (B) for a task-level router or module at `site`, checked: present, one
/// per example of the batch, each in 0..num_tasks-1. Errors name the site and say how to pass them.
const at::Tensor& current_task_ids(const std::string& site, int64_t batch, int64_t num_tasks);

}  // namespace mdl
