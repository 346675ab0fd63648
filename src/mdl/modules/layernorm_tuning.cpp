#include "mdl/modules/layernorm_tuning.h"

#include <ATen/ATen.h>

#include "mdl/core/error.h"

namespace mdl {

LayerNormTuningImpl::LayerNormTuningImpl(NormImpl& base) : base_(&base) {
  MDL_CHECK(base.site() != nullptr, "[layernorm] this norm is not a site");
  weight = register_parameter("weight", at::zeros_like(base.weight.detach()));
  if (base.bias.defined()) bias = register_parameter("bias", at::zeros_like(base.bias.detach()));
}

at::Tensor LayerNormTuningImpl::forward(const at::Tensor& input, const at::Tensor& current) {
  at::Tensor out = current + base_->normalize(input) * weight;  // (..., C)
  return bias.defined() ? out + bias : out;
}

void LayerNormTuningImpl::merge() {
  torch::NoGradGuard g;
  base_->weight.add_(weight);
  if (bias.defined()) base_->bias.add_(bias);
}

void LayerNormTuningImpl::unmerge() {
  torch::NoGradGuard g;
  base_->weight.sub_(weight);
  if (bias.defined()) base_->bias.sub_(bias);
}

}  // namespace mdl
