// GroupLinear: G independent linear maps applied in one batched product, y_g = x_g W_g + b_g, as the
// modules of a modular layer (Mittal et al., 2022). Weights (G, in, out) and biases (G, out), each drawn
// U(-1/sqrt(in), 1/sqrt(in)).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>

namespace mdl {

class GroupLinearImpl : public torch::nn::Module {
 public:
  GroupLinearImpl(int64_t groups, int64_t in, int64_t out, uint64_t seed);
  /// x (N, G, in) -> (N, G, out).
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;  // (G, in, out)
  at::Tensor bias;    // (G, out)
};
TORCH_MODULE(GroupLinear);

}  // namespace mdl
