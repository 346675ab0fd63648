#include "mdl/routing/routing_context.h"

#include <ATen/ATen.h>

#include "mdl/core/error.h"
#include "mdl/core/forward_context.h"

namespace mdl {

RoutingContext RoutingContext::by_id(const at::Tensor& ids,
                                     const std::vector<std::vector<ModuleChoice>>& table, bool language) {
  MDL_CHECK(ids.dim() == 1, "[routing] ", language ? "language" : "task", " ids must be (B), got ",
            ids.sizes());
  RoutingContext c;
  (language ? c.language_ids : c.task_ids) = ids;
  at::Tensor cpu = ids.to(at::kCPU, at::kLong).contiguous();
  const int64_t* p = cpu.data_ptr<int64_t>();
  for (int64_t b = 0; b < cpu.numel(); ++b) {
    MDL_CHECK(p[b] >= 0 && p[b] < static_cast<int64_t>(table.size()), "[routing] example ", b, " has ",
              language ? "language" : "task", " id ", p[b], " but the routing table has ", table.size(),
              " entries (ids 0..", static_cast<int64_t>(table.size()) - 1, ")");
    c.modules.push_back(table[p[b]]);
  }
  return c;
}

const at::Tensor& current_task_ids(const std::string& site, int64_t batch, int64_t num_tasks) {
  const ForwardContext& ctx = ForwardContext::current();
  MDL_CHECK(ctx.routing && ctx.routing->task_ids.defined(), "[routing] '", site,
            "' routes by task: pass task ids in the routing context (ModelInput::routing->task_ids)");
  const at::Tensor& ids = ctx.routing->task_ids;
  MDL_CHECK(ids.dim() == 1 && ids.size(0) == batch, "[routing] '", site, "': task ids must be (", batch,
            "), got ", ids.sizes());
  const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
  MDL_CHECK(lo >= 0 && hi < num_tasks, "[routing] '", site, "': task id ", lo < 0 ? lo : hi,
            " out of range; it knows ", num_tasks,
            " tasks (the module's options.num_tasks: create it with at least as many tasks as the data has)");
  return ids;
}

}  // namespace mdl
