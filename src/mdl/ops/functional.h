// The math of the Transformer blocks as pure functions; modules hold weights and call these.
// Dimension letters: B batch, T query length, S key length (cached + T), H heads, Hkv key/value heads,
// D head size, C model width.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <utility>

namespace mdl::fn {

/// Rotary tables for `positions` (B, T): cos and sin, each (B, 1, T, D), float32 (HF's non-interleaved
/// layout: frequencies repeated over the two halves of the head).
std::pair<at::Tensor, at::Tensor> rope_tables(const at::Tensor& positions, int64_t head_dim, double theta);

/// Applies rotary embeddings to x (B, H, T, D): x * cos + rotate_half(x) * sin.
at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

/// Additive attention bias (B, 1, T, S): 0 where query t may see key s, -inf where not.
/// `key_mask` (B, S) marks real tokens with 1 (undefined: all real); `past` cached keys precede the T
/// queries; `causal` hides later keys; `sliding_window` > 0 hides keys more than that far behind.
at::Tensor attention_bias(const at::Tensor& key_mask, int64_t batch, int64_t query_len, int64_t past,
                          bool causal, int64_t sliding_window, c10::ScalarType dtype, c10::Device device);

/// softmax(q k^T / sqrt(D) + bias) v for q (B, H, T, D), k and v (B, Hkv, S, D), H a multiple of Hkv
/// (grouped-query attention: head h reads key/value head h / (H / Hkv)); bias (B or 1, 1 or H, T, S) or
/// undefined. Returns (B, H, T, D). Softmax in float32.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias);

/// The activation named as in HF configs: gelu (erf), gelu_new / gelu_pytorch_tanh / gelu_fast (tanh),
/// silu / swish, relu.
at::Tensor activation(const at::Tensor& x, const std::string& name);

/// The gated MLP activation activation(gate) * up; gate and up (..., I). SiLU goes through fused_ops'
/// swiglu (the same values; in training it saves two tensors, not three).
at::Tensor gated_activation(const at::Tensor& gate, const at::Tensor& up, const std::string& name);

/// RMSNorm as Llama computes it: in float32, then scaled by `weight` in the input dtype; through
/// fused_ops' rms_norm_fused (one pass on the CPU, fewer saved tensors in training).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

/// LayerNorm over the last dimension.
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);

}  // namespace mdl::fn
