#include "mdl/modules/bottleneck_adapter.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/core/fields.h"
#include "mdl/ops/functional.h"

namespace mdl {

void to_json(nlohmann::json& j, const AdapterOptions& o) {
  j = adapter_fields().write(o);
}

const FieldList<AdapterOptions>& adapter_fields() {
  static const FieldList<AdapterOptions> f =
      FieldList<AdapterOptions>("adapter")
          .add("config", &AdapterOptions::config,
               "pfeiffer (after the MLP) | houlsby (after attention and MLP) | parallel")
          .add("reduction_factor", &AdapterOptions::reduction_factor,
               "bottleneck = hidden / reduction_factor (at least 1)")
          .add("non_linearity", &AdapterOptions::non_linearity, "relu | gelu | silu | tanh")
          .add("residual", &AdapterOptions::residual, "sequential adapters add their input back")
          .add("layer_norm", &AdapterOptions::layer_norm, "a LayerNorm on the adapter's input")
          .add("scaling", &AdapterOptions::scaling, "parallel adapters' output scale s (He et al. use 4)")
          .check([](const AdapterOptions& o) { validate(o); });
  return f;
}

void validate(const AdapterOptions& o) {
  MDL_CHECK(o.config == "pfeiffer" || o.config == "houlsby" || o.config == "parallel", "[adapter] config '",
            o.config, "' is unknown; expected pfeiffer, houlsby or parallel");
  MDL_CHECK(o.reduction_factor > 0, "[adapter] reduction_factor must be > 0, got ", o.reduction_factor);
  MDL_CHECK(o.non_linearity == "relu" || o.non_linearity == "gelu" || o.non_linearity == "silu" ||
                o.non_linearity == "tanh",
            "[adapter] non_linearity '", o.non_linearity, "' is unknown; expected relu, gelu, silu or tanh");
}

void from_json(const nlohmann::json& j, AdapterOptions& o) {
  o = adapter_fields().read(j);
}

BottleneckAdapterImpl::BottleneckAdapterImpl(const SiteInfo& site, const AdapterOptions& o, uint64_t seed,
                                             c10::TensorOptions dtype)
    : options(o) {
  MDL_CHECK(site.kind == SiteKind::sublayer, "[adapter] '", site.name,
            "' is not an attention or MLP sublayer site");
  const int64_t C = site.out_features;
  bottleneck = std::max<int64_t>(1, C / o.reduction_factor);
  auto gen = at::detail::createCPUGenerator(seed);
  const double bound = 1.0 / std::sqrt(static_cast<double>(C));
  auto down = register_module("adapter_down", std::make_shared<torch::nn::Module>("adapter_down"));
  auto linear0 = down->register_module("0", std::make_shared<torch::nn::Module>("0"));
  down_w = linear0->register_parameter("weight",
                                       at::empty({bottleneck, C}).uniform_(-bound, bound, gen).to(dtype));
  down_b = linear0->register_parameter("bias", at::zeros({bottleneck}, dtype));
  auto up = register_module("adapter_up", std::make_shared<torch::nn::Module>("adapter_up"));
  up_w = up->register_parameter("weight", at::zeros({C, bottleneck}, dtype));
  up_b = up->register_parameter("bias", at::zeros({C}, dtype));
  if (o.layer_norm) {
    auto norm =
        register_module("adapter_norm_before", std::make_shared<torch::nn::Module>("adapter_norm_before"));
    norm_w = norm->register_parameter("weight", at::ones({C}, dtype));
    norm_b = norm->register_parameter("bias", at::zeros({C}, dtype));
  }
}

at::Tensor BottleneckAdapterImpl::forward(const at::Tensor& input, const at::Tensor& current) {
  const bool parallel = options.config == "parallel";
  at::Tensor h = parallel ? input : current;  // (B, T, C)
  if (norm_w.defined()) h = fn::layer_norm(h, norm_w, norm_b, 1e-5);
  at::Tensor z = at::linear(h, down_w, down_b);  // (B, T, bottleneck)
  z = options.non_linearity == "tanh" ? at::tanh(z) : fn::activation(z, options.non_linearity);
  at::Tensor a = at::linear(z, up_w, up_b);  // (B, T, C)
  if (parallel) return current + options.scaling * a;
  return options.residual ? current + a : a;
}

}  // namespace mdl
