// Parallel composition (AdapterHub's Parallel block): one input through several module selections in a
// single forward pass, one output per branch. The batch is repeated once per branch and each copy is
// routed to its branch's modules by per-example fixed routing, so every branch shares the pass.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "mdl/backbones/model.h"
#include "mdl/routing/routing_context.h"

namespace mdl {

/// The model's output for `in` under each branch's modules (branch k: its list of module choices; an
/// empty list is the base model). `in.routing` may carry task ids; its module lists are replaced. No KV
/// cache.
std::vector<at::Tensor> parallel_forward(ModelImpl& model, const ModelInput& in,
                                         const std::vector<std::vector<ModuleChoice>>& branches);

}  // namespace mdl
