// Communication between recurrent modules (RIMs, S2RMs): each module reads the others by attention and adds
// what it reads to its state, h^_m = h_m + sum_m' softmax_m'(q_m . k_m' / sqrt(dk) + bias_mm') v_m', with
// per-module query, key and value maps. `bias` restricts who talks to whom: S2RMs pass log K(s_m, s_m')
// (-inf where the kernel is 0); RIMs none (all to all).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "mdl/modularity/group_linear.h"

namespace mdl {

class ModuleCommunicationImpl : public torch::nn::Module {
 public:
  ModuleCommunicationImpl(int64_t modules, int64_t hidden, int64_t key_dim, uint64_t seed);
  /// h (B, M, H), bias (M, M) or undefined (each row needs one finite entry) -> (B, M, H).
  at::Tensor forward(const at::Tensor& h, const at::Tensor& bias = {});

 private:
  int64_t key_dim_;
  GroupLinear query{nullptr}, key{nullptr}, value{nullptr};
};
TORCH_MODULE(ModuleCommunication);

}  // namespace mdl
