// Causal stick-breaking attention (ModuleFormer, Shen et al., 2023; Tan et al.'s stick-breaking
// attention): instead of a softmax over the keys, query i breaks a stick of length 1 walking back from
// its own position: key j takes the fraction z_ij of what the later keys left,
//   l_ij = q_i . k_j / sqrt(D),  z_ij = sigmoid(l_ij),
//   A_ij = z_ij * prod_{j < t <= i} (1 - z_it)  =  exp(logsigmoid(l_ij) + sum_{j < t <= i}
//   logsigmoid(-l_it)),
// for keys j at or before the query's position. A row sums to at most 1; the remainder is dropped. The sum
// over t is one reverse cumulative sum over the keys in log space (O(T S), where IBM's code multiplies by
// a triangular matrix, O(T^2 S)). A masked key (padding) is transparent: z = 0 and it breaks nothing.
// Dimension letters: B batch, H heads, T queries, S keys (cached + T: query i sits at position S - T + i).
#pragma once

#include <ATen/core/Tensor.h>

namespace mdl::fn {

/// y (B, H, T, D) = A v for q (B, H, T, D), k and v (B, H, S, D); key_mask (B, S), 1 for real keys, or
/// undefined. More leading dimensions work too (q (B, K, H, T, D)), and keys and values of size 1 in any
/// of them are shared (k (B, 1, H, S, D): K query sets over one set of keys, nothing copied). With
/// `remainder`, also 1 - sum_j A_ij (B, H, T): what no key took.
at::Tensor stick_breaking_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& key_mask, at::Tensor* remainder = nullptr);

/// The weights A (B, H, T, S) themselves.
at::Tensor stick_breaking_weights(const at::Tensor& q, const at::Tensor& k, const at::Tensor& key_mask);

}  // namespace mdl::fn
