#include "mdl/aggregation/parallel.h"

#include <ATen/ATen.h>

#include "mdl/core/error.h"

namespace mdl {

std::vector<at::Tensor> parallel_forward(ModelImpl& model, const ModelInput& in,
                                         const std::vector<std::vector<ModuleChoice>>& branches) {
  MDL_CHECK(!branches.empty(), "[parallel] no branches");
  MDL_CHECK(in.cache == nullptr, "[parallel] runs without a KV cache: each branch would need its own");
  const int64_t N = static_cast<int64_t>(branches.size()), B = in.input_ids.size(0);
  auto repeat = [N](const at::Tensor& t) {
    return t.defined() ? at::cat(std::vector<at::Tensor>(N, t), 0) : t;
  };
  ModelInput rep = in;
  rep.input_ids = repeat(in.input_ids);
  rep.attention_mask = repeat(in.attention_mask);
  rep.token_type_ids = repeat(in.token_type_ids);
  rep.position_ids = repeat(in.position_ids);
  RoutingContext routing;
  if (in.routing) {
    routing.task_ids = repeat(in.routing->task_ids);
    routing.language_ids = repeat(in.routing->language_ids);
  }
  for (const auto& branch : branches)  // copy k of the batch is branch k
    for (int64_t b = 0; b < B; ++b) routing.modules.push_back(branch);
  rep.routing = &routing;
  at::Tensor out = model.forward(rep);
  return out.chunk(N, 0);
}

}  // namespace mdl
