#include "mdl/modules/bitfit.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include "mdl/core/error.h"

namespace mdl {

BiasDeltaImpl::BiasDeltaImpl(SiteLinearImpl& base) : base_(&base) {
  bias = register_parameter("bias", at::zeros({base.site()->info().out_features}, base.weight.options()));
}

void BiasDeltaImpl::merge() {
  torch::NoGradGuard g;
  MDL_CHECK(base_->bias.defined(), "[bitfit] '", base_->site()->name(), "' has no bias to merge into");
  base_->bias.add_(bias);
}

void BiasDeltaImpl::unmerge() {
  torch::NoGradGuard g;
  base_->bias.sub_(bias);
}

}  // namespace mdl
