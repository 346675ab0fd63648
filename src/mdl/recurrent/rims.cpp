#include "mdl/recurrent/rims.h"

#include <ATen/ATen.h>
#include <torch/nn/modules/activation.h>

#include <cmath>

#include "mdl/core/error.h"

namespace mdl {

RimsImpl::RimsImpl(const WorldModelOptions& o) : options_(o) {
  const int64_t M = o.modules, H = o.hidden;
  MDL_CHECK(o.top_k >= 1 && o.top_k <= M, "[rims] top_k must be 1 to the ", M, " modules, got ", o.top_k);
  torch::manual_seed(o.seed);
  view_encoder = register_module("view_encoder",
                                 torch::nn::Sequential(torch::nn::Linear(o.feature_dim + o.location_dim, 32),
                                                       torch::nn::ReLU(), torch::nn::Linear(32, 32)));
  key = register_module("key", torch::nn::Linear(32, o.key_dim));
  value = register_module("value", torch::nn::Linear(32, o.value_dim));
  query = register_module("query", GroupLinear(M, H, o.key_dim, o.seed + 1));
  cells = register_module("cells", ModuleGru(M, o.value_dim, H, o.seed + 2));
  communication = register_module("communication", ModuleCommunication(M, H, o.key_dim, o.seed + 3));
  decoder = register_module(
      "decoder", torch::nn::Sequential(torch::nn::Linear(M * H + o.location_dim, 64), torch::nn::ReLU(),
                                       torch::nn::Linear(64, o.output_dim)));
}

at::Tensor RimsImpl::initial_state(int64_t batch) const {
  return at::zeros({batch, options_.modules, options_.hidden}, cells->weight_ih.options());
}

at::Tensor RimsImpl::step(const Views& views, const at::Tensor& h, StepTrace* trace) {
  check_views(views, h, options_, options_.modules, "rims");
  const int64_t B = h.size(0), V = views.features.size(1);
  const double scale = 1.0 / std::sqrt(static_cast<double>(options_.key_dim));
  at::Tensor z = view_encoder->forward(at::cat({views.features, views.locations}, -1));  // (B, V, 32)
  z = at::cat({z, at::zeros({B, 1, z.size(2)}, z.options())}, 1);                        // + the null view
  at::Tensor logits = at::matmul(query->forward(h), key->forward(z).transpose(1, 2)) * scale;  // (B, M, V+1)
  if (views.mask.defined()) {
    const at::Tensor real = at::cat({views.mask, at::ones({B, 1}, views.mask.options())}, 1);
    logits = logits.masked_fill(~real.unsqueeze(1), -INFINITY);
  }
  const at::Tensor alpha = at::softmax(logits, -1);
  // The k modules that attend least to the null view take input this step.
  const at::Tensor top = std::get<1>((-alpha.select(-1, V)).topk(options_.top_k, -1));  // (B, k)
  const at::Tensor active = at::zeros({B, options_.modules}, at::kBool).scatter_(1, top, true);
  const at::Tensor act = active.unsqueeze(-1);
  const at::Tensor reads = alpha.narrow(-1, 0, V) * act.to(alpha.scalar_type());  // (B, M, V)
  const at::Tensor u = at::matmul(reads, value->forward(z.narrow(1, 0, V)));
  const at::Tensor h_new = cells->forward(u, h);
  const at::Tensor h_comm = communication->forward(h_new);  // all to all
  if (trace) *trace = {at::Tensor(), reads.detach(), active, at::Tensor()};
  return at::where(act, h_comm, h);
}

at::Tensor RimsImpl::decode(const at::Tensor& h, const at::Tensor& queries) {
  MDL_CHECK(queries.dim() == 3 && queries.size(0) == h.size(0) && queries.size(2) == options_.location_dim,
            "[rims] queries must be (B, Q, ", options_.location_dim, ") for a state of batch ", h.size(0),
            ", got ", queries.sizes());
  const at::Tensor flat = h.reshape({h.size(0), 1, -1}).expand({-1, queries.size(1), -1});
  return decoder->forward(at::cat({flat, queries}, -1));
}

}  // namespace mdl
