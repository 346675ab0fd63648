// ModuleFormer's mixture of attention heads (MoA; Shen et al., 2023, after Zhang et al.'s MoA): each
// attention expert e is a query projection W_q^e (C -> A) and an output projection W_o^e (A -> C) over
// A = heads x head size; keys and values are one shared projection each (C -> A, with bias). Every token
// picks its top-k experts by a gate; each chosen expert's queries attend (stick-breaking, causal) over the
// shared keys and values, and its output projection is weighted by the gate and summed:
//   y_t = sum_{e in top-k(t)} g_te W_o^e attend(W_q^e x_t, K, V)
// The queries and output projections run as grouped dispatch (each expert once on its tokens); the
// attention runs once for all k slots, the slots stacked as extra heads.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <memory>

#include "mdl/routing/gates.h"
#include "mdl/routing/group_router.h"

namespace mdl {

/// MoA settings.
struct MoaOptions {
  int64_t experts = 8;      ///< attention experts
  int64_t k = 2;            ///< experts per token
  int64_t heads = 2;        ///< heads per expert (A = heads x head size)
  int64_t att_hidden = 32;  ///< A
  GateOptions gate;         ///< the router's scores
};

/// One layer's mixture of attention heads.
class MixtureOfAttentionImpl : public torch::nn::Module {
 public:
  /// `site` names the layer in the routing log; weights N(0, 0.02) from `seed`.
  MixtureOfAttentionImpl(const std::string& site, int64_t C, const MoaOptions& options, uint64_t seed,
                         c10::TensorOptions dtype);
  /// y (B, T, C) for x (B, T, C); key_mask (B, T), 1 for real tokens, or undefined.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& key_mask = {});

  MoaOptions options;
  at::Tensor q_w;       // (E, A, C)
  at::Tensor o_w;       // (E, C, A)
  at::Tensor k_w, k_b;  // (A, C), (A)
  at::Tensor v_w, v_b;  // (A, C), (A)
  Gate gate{nullptr};

 private:
  std::shared_ptr<LearnedRouter> router_;
};
TORCH_MODULE(MixtureOfAttention);

}  // namespace mdl
