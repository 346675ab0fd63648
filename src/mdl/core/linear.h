// The projection y = x W^T + b as the backbones' linear sites compute it when nothing folds into them.
// With a gradient it is one autograd node that keeps only what its backward needs: W for dx, and x for dW
// only when W is trained, as a Rebuild when x is a fused op's output (core/rebuild.h). at::linear's node
// would keep x always. Without a gradient it is at::linear, the same values.
#pragma once

#include <ATen/core/Tensor.h>

namespace mdl {

/// x (..., in), weight (out, in), bias (out) or undefined -> (..., out).
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

}  // namespace mdl
