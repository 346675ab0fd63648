#include "mdl/routing/gates.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "mdl/core/error.h"

namespace mdl {

GateImpl::GateImpl(const GateOptions& o, int64_t in, int64_t E, uint64_t seed, c10::TensorOptions dtype)
    : options_(o) {
  MDL_CHECK(o.kind == "linear" || o.kind == "mlp" || o.kind == "gmm", "[gate] kind '", o.kind,
            "' is unknown; expected linear, mlp or gmm");
  MDL_CHECK(in > 0 && E > 0 && o.hidden > 0, "[gate] in, experts and hidden must be > 0, got ", in, ", ", E,
            ", ", o.hidden);
  auto gen = at::detail::createCPUGenerator(seed);
  auto normal = [&](std::vector<int64_t> shape, double std) {
    return at::empty(shape).normal_(0.0, std, gen).to(dtype);
  };
  // IBM's nesting: w_gate is an nn.Sequential (linear, mlp) or an nn.Linear (gmm).
  auto child = [](torch::nn::Module& parent, const std::string& name) {
    return parent.register_module(name, std::make_shared<torch::nn::Module>(name));
  };
  auto w_gate = child(*this, "w_gate");
  if (o.kind == "linear") {
    auto first = child(*w_gate, "0");
    weight = first->register_parameter("weight", normal({E, in}, 0.02));
    if (o.bias) bias = first->register_parameter("bias", at::zeros({E}).to(dtype));
  } else if (o.kind == "mlp") {
    auto first = child(*w_gate, "0"), last = child(*w_gate, "3");  // 1: GELU, 2: dropout
    fc1_w = first->register_parameter("weight", normal({o.hidden, in}, 0.02));
    fc1_b = first->register_parameter("bias", at::zeros({o.hidden}).to(dtype));
    fc2_w = last->register_parameter("weight", normal({E, o.hidden}, 0.02));
  } else {
    proj = w_gate->register_parameter("weight", normal({o.hidden, in}, 0.02));
    centroids = register_parameter("expert_centroids", normal({E, o.hidden}, 1.0));
    temp = register_parameter("temperature", at::zeros({1}).to(dtype));
  }
}

at::Tensor GateImpl::scores(const at::Tensor& rows) const {
  MDL_CHECK(rows.dim() == 2, "[gate] scores (N, C) rows, got ", rows.sizes());
  if (options_.kind == "linear") return at::linear(rows, weight, bias);
  if (options_.kind == "mlp") return at::linear(at::gelu(at::linear(rows, fc1_w, fc1_b)), fc2_w);
  // gmm: cosine of the projected row to each centroid, times e^tau.
  at::Tensor z = at::linear(rows, proj);                                 // (N, H)
  at::Tensor cos = at::matmul(z / z.norm(2, -1, true).clamp_min(1e-12),  // (N, E)
                              (centroids / centroids.norm(2, -1, true).clamp_min(1e-12)).t());
  return cos * temp.exp();
}

std::vector<std::string> GateImpl::expert_rows(const std::string& kind, bool bias) {
  if (kind == "linear")
    return bias ? std::vector<std::string>{"w_gate.0.weight", "w_gate.0.bias"}
                : std::vector<std::string>{"w_gate.0.weight"};
  if (kind == "mlp") return {"w_gate.3.weight"};
  if (kind == "gmm") return {"expert_centroids"};
  MDL_FAIL("[gate] kind '", kind, "' is unknown; expected linear, mlp or gmm");
}

}  // namespace mdl
