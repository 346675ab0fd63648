// ModuleFormer's mixture of attention heads (MoA; Shen et al., 2023, after Zhang et al.'s MoA): each
// attention expert e is a query projection W_q^e (C -> A) and an output projection W_o^e (A -> C) over
// A = heads x head size; keys and values are one shared projection each, which the backbone computes (they
// are sites, and the KV cache holds them). A router picks each token's experts; each chosen expert's
// queries attend (stick-breaking, causal) over the shared keys and values, and its output projection is
// weighted by the router and summed:
//   y_t = sum_{e routed for t} g_te W_o^e attend(W_q^e x_t, K, V)
// This is IBM's `q_proj` MoE (`map`, the attention, `reduce`) under its tensor names: `experts.weight`
// (E, C, A) and `output_experts.weight` (E, A, C), stored (in, out) as IBM's ParallelExperts, and `gate`.
// The queries and output projections run as grouped dispatch (each expert once on its assignments). Any
// router works: a token's assignments become query slots (slot j: its j-th expert), and the slots attend
// together, as extra heads over the one set of keys. ModuleFormer's own router is top-k of the softmax,
// not renormalised (`moduleformer_router`).
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <memory>
#include <string>

#include "mdl/routing/gates.h"
#include "mdl/routing/group_router.h"

namespace mdl {

/// ModuleFormer's routing: the top-k router probabilities, not renormalised; `sample_topk` of them drawn in
/// training.
RouterOptions moduleformer_router(int64_t k, int64_t sample_topk = 0);

/// MoA settings.
struct MoaOptions {
  int64_t experts = 8;                            ///< attention experts
  int64_t heads = 2;                              ///< heads per expert (A = heads x head size)
  int64_t att_hidden = 32;                        ///< A
  GateOptions gate;                               ///< the router's scores
  RouterOptions router = moduleformer_router(2);  ///< the policy over the gate's scores
};

/// One layer's mixture of attention heads.
class MixtureOfAttentionImpl : public torch::nn::Module {
 public:
  /// `site` names the layer in the routing log; weights N(0, 0.02) from `seed`.
  MixtureOfAttentionImpl(const std::string& site, int64_t C, const MoaOptions& options, uint64_t seed,
                         c10::TensorOptions dtype);
  /// y (B, T, C) for x (B, T, C) attending over the shared keys and values k, v (B, H, S, D), S = cached +
  /// T (query t sits at position S - T + t); key_mask (B, S), 1 for real tokens, or undefined.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& key_mask = {});
  /// Replaces the routing policy (the gate stays); task level is refused (the gate scores tokens).
  void set_router(const RouterOptions& options);
  const Router& policy() const { return router_->policy(); }

  MoaOptions options;
  at::Tensor q_w;  // experts.weight (E, C, A)
  at::Tensor o_w;  // output_experts.weight (E, A, C)
  Gate gate{nullptr};

 private:
  std::string site_;
  std::shared_ptr<LearnedRouter> router_;
};
TORCH_MODULE(MixtureOfAttention);

}  // namespace mdl
