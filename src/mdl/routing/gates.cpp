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
  if (o.kind == "linear") {
    weight = register_parameter("weight", normal({E, in}, 0.02));
    if (o.bias) bias = register_parameter("bias", at::zeros({E}).to(dtype));
  } else if (o.kind == "mlp") {
    fc1_w = register_parameter("fc1_weight", normal({o.hidden, in}, 0.02));
    fc1_b = register_parameter("fc1_bias", at::zeros({o.hidden}).to(dtype));
    fc2_w = register_parameter("fc2_weight", normal({E, o.hidden}, 0.02));
  } else {
    proj = register_parameter("proj", normal({o.hidden, in}, 0.02));
    centroids = register_parameter("centroids", normal({E, o.hidden}, 1.0));
    temperature = register_parameter("temperature", at::zeros({}).to(dtype));
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
  return cos * temperature.exp();
}

}  // namespace mdl
