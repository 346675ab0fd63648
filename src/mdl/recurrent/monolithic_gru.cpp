#include "mdl/recurrent/monolithic_gru.h"

#include <ATen/ATen.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/linear.h>

#include "mdl/core/error.h"

namespace mdl {

MonolithicGruImpl::MonolithicGruImpl(const WorldModelOptions& o) : options_(o) {
  torch::manual_seed(o.seed);
  view_encoder = register_module("view_encoder",
                                 torch::nn::Sequential(torch::nn::Linear(o.feature_dim + o.location_dim, 64),
                                                       torch::nn::ReLU(), torch::nn::Linear(64, 64)));
  cell = register_module("cell", ModuleGru(1, 64, o.hidden, o.seed + 1));
  decoder = register_module(
      "decoder", torch::nn::Sequential(torch::nn::Linear(o.hidden + o.location_dim, 64), torch::nn::ReLU(),
                                       torch::nn::Linear(64, o.output_dim)));
}

at::Tensor MonolithicGruImpl::initial_state(int64_t batch) const {
  return at::zeros({batch, 1, options_.hidden}, cell->weight_ih.options());
}

at::Tensor MonolithicGruImpl::step(const Views& views, const at::Tensor& h, StepTrace* trace) {
  check_views(views, h, options_, 1, "gru");
  const at::Tensor z = view_encoder->forward(at::cat({views.features, views.locations}, -1));  // (B, V, 64)
  at::Tensor pooled;
  if (views.mask.defined()) {
    const at::Tensor m = views.mask.unsqueeze(-1).to(z.scalar_type());
    pooled = (z * m).sum(1) / m.sum(1).clamp_min(1.0);
  } else {
    pooled = z.mean(1);
  }
  if (trace) *trace = {};
  return cell->forward(pooled.unsqueeze(1), h);
}

at::Tensor MonolithicGruImpl::decode(const at::Tensor& h, const at::Tensor& queries) {
  MDL_CHECK(queries.dim() == 3 && queries.size(0) == h.size(0) && queries.size(2) == options_.location_dim,
            "[gru] queries must be (B, Q, ", options_.location_dim, ") for a state of batch ", h.size(0),
            ", got ", queries.sizes());
  return decoder->forward(at::cat({h.expand({-1, queries.size(1), -1}), queries}, -1));
}

}  // namespace mdl
