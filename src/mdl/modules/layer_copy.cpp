#include "mdl/modules/layer_copy.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include "mdl/core/error.h"

namespace mdl {

LayerCopyImpl::LayerCopyImpl(SiteLinearImpl& base)
    : base_(&base), tied_(base.named_parameters(/*recurse=*/false).find("weight") == nullptr) {
  torch::NoGradGuard g;
  weight = register_parameter("weight", base.weight.detach().clone());
  if (base.bias.defined()) bias = register_parameter("bias", base.bias.detach().clone());
}

at::Tensor LayerCopyImpl::forward(const at::Tensor& input, const at::Tensor& current) {
  // input (..., in), current (..., out)
  const at::Tensor dw = weight - base_->weight;
  const at::Tensor db = bias.defined() ? bias - base_->bias : at::Tensor();
  return current + at::linear(input, dw, db);
}

at::Tensor LayerCopyImpl::forward_linear(const at::Tensor& input, const at::Tensor& base_weight,
                                         const at::Tensor& base_bias) {
  MDL_CHECK(base_weight.sizes() == weight.sizes(), "[modules_to_save] '", base_->site()->name(),
            "': the projection is ", base_weight.sizes(), " but the copy ", weight.sizes());
  return at::linear(input, weight, bias.defined() ? bias : base_bias);
}

void LayerCopyImpl::merge() {
  MDL_CHECK(!tied_, "[modules_to_save] '", base_->site()->name(),
            "' shares its weight with the embeddings; its copy cannot be merged into it");
  torch::NoGradGuard g;
  saved_weight_ = base_->weight.detach().clone();
  base_->weight.copy_(weight);
  if (bias.defined()) saved_bias_ = base_->bias.detach().clone(), base_->bias.copy_(bias);
}

void LayerCopyImpl::unmerge() {
  torch::NoGradGuard g;
  MDL_CHECK(saved_weight_.defined(), "[modules_to_save] '", base_->site()->name(), "' is not merged");
  base_->weight.copy_(saved_weight_);
  if (saved_bias_.defined()) base_->bias.copy_(saved_bias_);
  saved_weight_ = at::Tensor(), saved_bias_ = at::Tensor();
}

std::string layer_copy_axes(const std::string& param) {
  if (param == "weight") return "oi";
  if (param == "bias") return "o";
  MDL_FAIL("[modules_to_save] a layer copy has parameters 'weight' and 'bias', not '", param, "'");
}

}  // namespace mdl
