#include "mdl/core/site.h"

#include <ATen/ATen.h>

#include "mdl/core/linear.h"

namespace mdl {

at::Tensor SiteFunction::forward_linear(const at::Tensor& input, const at::Tensor& weight,
                                        const at::Tensor& bias) {
  return forward(input, linear(input, weight, bias));
}

at::Tensor Site::apply_linear(const at::Tensor& input, const at::Tensor& weight,
                              const at::Tensor& bias) const {
  return function_ ? function_->forward_linear(input, weight, bias) : linear(input, weight, bias);
}

}  // namespace mdl
