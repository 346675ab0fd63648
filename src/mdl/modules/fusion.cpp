#include "mdl/modules/fusion.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/routing/mixture.h"

namespace mdl {

void to_json(nlohmann::json& j, const FusionOptions& o) {
  j = {{"members", o.members}, {"kind", o.kind}, {"temperature", o.temperature}, {"router", o.router}};
}

void from_json(const nlohmann::json& j, FusionOptions& o) {
  o = FusionOptions();
  if (j.contains("members")) o.members = j["members"].get<std::vector<std::string>>();
  o.kind = j.value("kind", o.kind);
  o.temperature = j.value("temperature", o.temperature);
  if (j.contains("router")) o.router = j["router"].get<RouterOptions>();
  MDL_CHECK(o.members.size() >= 2, "[fusion] fuses at least 2 modules, got ", o.members.size());
  MDL_CHECK(o.kind == "attention" || o.kind == "gate" || o.kind == "mixture", "[fusion] kind '", o.kind,
            "' is unknown; expected attention, gate or mixture");
  MDL_CHECK(o.kind != "mixture" || o.router.level != "task", "[fusion] a mixture's router scores the site's input: "
            "level token or example (task-level mixtures: poly_lora or lora_moe with num_tasks)");
  MDL_CHECK(o.temperature > 0, "[fusion] temperature must be > 0, got ", o.temperature);
}

FusionImpl::FusionImpl(const SiteInfo& site, const FusionOptions& o, std::vector<std::shared_ptr<SiteModule>> members,
                       uint64_t seed, c10::TensorOptions dtype)
    : options(o), site_(site), members_(std::move(members)) {
  const int64_t C = site.out_features, N = static_cast<int64_t>(members_.size());
  for (const auto& m : members_) absorbed_.push_back(m.get());
  auto gen = at::detail::createCPUGenerator(seed);
  if (o.kind == "attention") {  // as AdapterFusion: small random query and key, identity value
    query = register_parameter("query", at::empty({C, C}).normal_(0.0, 0.02, gen).to(dtype));
    key = register_parameter("key", at::empty({C, C}).normal_(0.0, 0.02, gen).to(dtype));
    value = register_parameter("value", at::eye(C).to(dtype));
  } else if (o.kind == "gate") {
    gate_w = register_parameter("gate_weight", at::zeros({N, C}).to(dtype));
    gate_b = register_parameter("gate_bias", at::zeros({N}).to(dtype));
  } else {
    router_w = register_parameter("router", at::empty({N, site.in_features}).normal_(0.0, 0.02, gen).to(dtype));
    router_ = make_router(o.router);
  }
}

at::Tensor FusionImpl::forward_mixture(const at::Tensor& input, const at::Tensor& current) {
  MDL_CHECK(input.dim() == 3 && current.dim() == 3, "[fusion] mixture at '", site_.name, "' routes (B, T, C) inputs, got ",
            input.sizes(), " and ", current.sizes());
  const int64_t Bn = input.size(0), T = input.size(1), in = input.size(2), out = current.size(2);
  const int64_t N = static_cast<int64_t>(members_.size());
  Routing r = route_tokens(*router_, site_.name, "fusion", input, N,
                           [&](const at::Tensor& rows) { return at::matmul(rows.to(router_w.scalar_type()), router_w.t()); },
                           at::Tensor(), is_training());
  // Each token's row carries its input and current output, so an expert sees both for its rows only.
  at::Tensor rows = at::cat({input.reshape({Bn * T, in}).to(current.scalar_type()), current.reshape({Bn * T, out})}, 1);
  at::Tensor y = dispatch(rows, r, out, [&](int64_t e, const at::Tensor& block) {
    at::Tensor x = block.narrow(1, 0, in).unsqueeze(0), h = block.narrow(1, in, out).unsqueeze(0);  // (1, n, .)
    at::Tensor next = members_[static_cast<size_t>(e)]->forward(x.to(input.scalar_type()), h);
    MDL_CHECK(next.sizes() == h.sizes(), "[fusion] at '", site_.name, "': expert ", e, " changes the output's shape");
    return (next - h).squeeze(0);
  });
  last_weights_ = r.dense_weights().detach().view({Bn, T, N});
  return current + y.view({Bn, T, out});
}

at::Tensor FusionImpl::forward(const at::Tensor& input, const at::Tensor& current) {
  if (options.kind == "mixture") return forward_mixture(input, current);
  std::vector<at::Tensor> changes;
  for (const auto& m : members_) {
    at::Tensor next = m->forward(input, current);
    MDL_CHECK(next.sizes() == current.sizes(), "[fusion] at '", site_.name, "': member ", m->type(),
              " changes the output's shape (", current.sizes(), " -> ", next.sizes(), "); only same-shape modules fuse");
    changes.push_back(next - current);
  }
  at::Tensor o = at::stack(changes, -2);                      // (..., N, C)
  at::Tensor h = current.to(o.scalar_type());                 // (..., C)
  if (options.kind == "attention") {
    at::Tensor q = at::matmul(h, query.t()).unsqueeze(-2);      // (..., 1, C)
    at::Tensor k = at::matmul(o, key.t());                      // (..., N, C)
    at::Tensor a = at::softmax((q * k).sum(-1) / options.temperature, -1);  // (..., N)
    last_weights_ = a.detach();
    return current + (a.unsqueeze(-1) * at::matmul(o, value.t())).sum(-2);
  }
  at::Tensor g = at::sigmoid(at::matmul(h, gate_w.t()) + gate_b);  // (..., N)
  last_weights_ = g.detach();
  return current + (g.unsqueeze(-1) * o).sum(-2);
}

}  // namespace mdl
