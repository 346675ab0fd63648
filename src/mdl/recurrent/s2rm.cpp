#include "mdl/recurrent/s2rm.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/modules/activation.h>

#include <cmath>
#include <limits>

#include "mdl/core/error.h"
#include "mdl/ops/spatial_kernel.h"

namespace mdl {
namespace {

torch::nn::Sequential mlp(int64_t in, int64_t hidden, int64_t out, bool bounded) {
  torch::nn::Sequential s(torch::nn::Linear(in, hidden), torch::nn::ReLU(), torch::nn::Linear(hidden, out));
  if (bounded) s->push_back(torch::nn::Tanh());
  return s;
}

/// log K with -inf where K = 0 (never log(0) in a gradient path).
at::Tensor log_kernel(const at::Tensor& k) {
  return at::log(k.clamp_min(std::numeric_limits<float>::min())).masked_fill(k == 0, -INFINITY);
}

}  // namespace

S2rmImpl::S2rmImpl(const WorldModelOptions& o) : options_(o) {
  const int64_t M = o.modules, H = o.hidden;
  MDL_CHECK(M > 0 && o.space_dim > 0 && o.feature_dim > 0 && o.location_dim > 0, "[s2rm] needs positive ",
            "sizes, got ", M, " modules, space ", o.space_dim, ", features ", o.feature_dim, ", locations ",
            o.location_dim);
  torch::manual_seed(o.seed);
  auto gen = at::detail::createCPUGenerator(o.seed);
  embeddings = register_parameter("embeddings", at::empty({M, o.space_dim}).uniform_(-1, 1, gen));
  location_encoder = register_module("location_encoder", mlp(o.location_dim, 32, o.space_dim, true));
  view_encoder = register_module("view_encoder", mlp(o.feature_dim, 32, 32, false));
  key = register_module("key", torch::nn::Linear(32, o.key_dim));
  value = register_module("value", torch::nn::Linear(32, o.value_dim));
  query = register_module("query", GroupLinear(M, H, o.key_dim, o.seed + 1));
  cells = register_module("cells", ModuleGru(M, o.value_dim, H, o.seed + 2));
  communication = register_module("communication", ModuleCommunication(M, H, o.key_dim, o.seed + 3));
  decoder = register_module("decoder", mlp(H + o.space_dim, 64, o.output_dim, false));
}

at::Tensor S2rmImpl::initial_state(int64_t batch) const {
  return at::zeros({batch, options_.modules, options_.hidden}, embeddings.options());
}

at::Tensor S2rmImpl::encode_locations(const at::Tensor& locations) {
  return location_encoder->forward(locations);
}

at::Tensor S2rmImpl::step(const Views& views, const at::Tensor& h, StepTrace* trace) {
  check_views(views, h, options_, options_.modules, "s2rm");
  const double scale = 1.0 / std::sqrt(static_cast<double>(options_.key_dim));
  const at::Tensor e = encode_locations(views.locations);                                       // (B, V, d_s)
  at::Tensor k_in = fn::truncated_kernel(embeddings, e, options_.bandwidth, options_.epsilon);  // (B, M, V)
  if (views.mask.defined()) k_in = k_in * views.mask.unsqueeze(1).to(k_in.scalar_type());
  const at::Tensor active = k_in.sum(-1) > 0;                  // (B, M)
  const at::Tensor z = view_encoder->forward(views.features);  // (B, V, 32)
  const at::Tensor logits =
      at::matmul(query->forward(h), key->forward(z).transpose(1, 2)) * scale + log_kernel(k_in);  // (B, M, V)
  // Rows of inactive modules are all -inf: softmax over zeros there, then zeroed.
  const at::Tensor act = active.unsqueeze(-1);
  const at::Tensor alpha = at::softmax(logits.masked_fill(~act, 0.0), -1) * act.to(logits.scalar_type());
  const at::Tensor u = at::matmul(alpha, value->forward(z));  // (B, M, value_dim)
  const at::Tensor h_new = cells->forward(u, h);
  const at::Tensor k_mm = fn::truncated_kernel(embeddings, embeddings, options_.bandwidth, options_.epsilon);
  const at::Tensor h_comm = communication->forward(h_new, log_kernel(k_mm));  // K(s_m, s_m) = 1: rows finite
  if (trace) *trace = {k_in.detach(), alpha.detach(), active, k_mm.detach()};
  return at::where(act, h_comm, h);
}

at::Tensor S2rmImpl::decode(const at::Tensor& h, const at::Tensor& queries) {
  MDL_CHECK(queries.dim() == 3 && queries.size(0) == h.size(0) && queries.size(2) == options_.location_dim,
            "[s2rm] queries must be (B, Q, ", options_.location_dim, ") for a state of batch ", h.size(0),
            ", got ", queries.sizes());
  const at::Tensor e = encode_locations(queries);  // (B, Q, d_s)
  const at::Tensor k =
      fn::truncated_kernel(embeddings, e, options_.bandwidth, options_.epsilon);  // (B, M, Q)
  const at::Tensor w = k / k.sum(1, /*keepdim=*/true).clamp_min(1e-12);
  const at::Tensor r = at::matmul(w.transpose(1, 2), h);  // (B, Q, H); 0 where no module is near
  return decoder->forward(at::cat({r, e}, -1));
}

}  // namespace mdl
