#include "mdl/core/site.h"

#include <ATen/ATen.h>

namespace mdl {

at::Tensor SiteFunction::forward_linear(const at::Tensor& input, const at::Tensor& weight,
                                        const at::Tensor& bias) {
  return forward(input, at::linear(input, weight, bias));
}

at::Tensor Site::apply_linear(const at::Tensor& input, const at::Tensor& weight,
                              const at::Tensor& bias) const {
  return function_ ? function_->forward_linear(input, weight, bias) : at::linear(input, weight, bias);
}

}  // namespace mdl
