// M GRU cells with their own weights, stepped in one batched product: the recurrent modules of S2RMs and
// RIMs. Cell m is torch's GRUCell with weight_ih[m] (3H, in), weight_hh[m] (3H, H) and biases (3H), gates
// in torch's order (reset, update, new):
//   r = sigma(W_ir x + b_ir + W_hr h + b_hr), z = sigma(W_iz x + b_iz + W_hz h + b_hz)
//   n = tanh(W_in x + b_in + r (W_hn h + b_hn)),  h' = (1 - z) n + z h
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <cstdint>

namespace mdl {

class ModuleGruImpl : public torch::nn::Module {
 public:
  /// Weights drawn U(-1/sqrt(H), 1/sqrt(H)), as GRUCell's.
  ModuleGruImpl(int64_t modules, int64_t in, int64_t hidden, uint64_t seed);
  /// x (B, M, in), h (B, M, H) -> h' (B, M, H).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& h);
  at::Tensor weight_ih, weight_hh;  // (M, 3H, in), (M, 3H, H)
  at::Tensor bias_ih, bias_hh;      // (M, 3H)
};
TORCH_MODULE(ModuleGru);

}  // namespace mdl
