// Training ops with a backward of their own. Composed from at:: ops, autograd keeps every intermediate
// (RMSNorm: the squared input, the normalised input; SwiGLU: SiLU's output; attention: the (B, H, T, S)
// probabilities; the LM loss: the logits, their log-softmax and its gradient, 3 x N x V floats). These
// keep only what their backward needs and make fewer passes over memory. RMSNorm's and SwiGLU's outputs
// can be rebuilt from what they keep (core/rebuild.h), so the projections that read them keep nothing
// of them. On the small preset at batch 8 x 128 a LoRA step's peak tensor memory is 176 MiB with all of
// this, 426 MiB with the composed ops (measured: mdl_bench --filter=lora_train).
// CPU float32 contiguous tensors take hand-written loops; every other device or dtype takes the same
// math in at:: ops, so the code runs unchanged on CUDA.
#pragma once

#include <ATen/core/Tensor.h>

namespace mdl::fn {

/// RMSNorm y = w * x / sqrt(mean(x^2) + eps) over the last dimension, computed in float32, saving only
/// x and the per-row 1/rms for backward. x (..., C), w (C). fn::rms_norm is this.
at::Tensor rms_norm_fused(const at::Tensor& x, const at::Tensor& w, double eps);

/// Rotary embeddings x * cos + rotate_half(x) * sin (HF's non-interleaved layout) in one pass each way,
/// saving nothing but the tables: x (B, H, T, D) with unit stride on D (the transposed view of a
/// projection is fine), cos and sin (B, 1, T, D) float32. Returns a contiguous (B, H, T, D), which the
/// attention's matrix products then read without a copy. CPU float32 only (callers check rope_fusable).
at::Tensor rope_fused(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
bool rope_fusable(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);

/// SwiGLU's gated activation silu(gate) * up, saving only gate and up. Both (..., I), same shape.
at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up);

/// softmax(q k^T / sqrt(D) + bias) v: q (B, H, T, D), k and v (B, Hkv, S, D) with H a multiple of Hkv,
/// bias (B or 1, 1 or H, T, S) or undefined; returns (B, H, T, D). With a gradient, one node that keeps q,
/// k, v and the bias and computes the probabilities again in backward rather than keeping them.
/// fn::attention checks the shapes and calls this.
at::Tensor attention_recomputed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& bias);

/// Mean cross-entropy of the logits hidden W^T (+ bias) against `targets`, never holding more than
/// `chunk_rows` rows of logits: hidden (N, C), weight (V, C), bias (V) or undefined, targets (N) int64,
/// rows whose target is `ignore_index` count for nothing. When a gradient is wanted, it is computed
/// chunk by chunk during the forward pass (the loss is a scalar, so backward only scales it), keeping
/// dL/dhidden (N, C) and dL/dweight (V, C) instead of three (N, V) tensors. Logits in float32.
at::Tensor linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                                const at::Tensor& targets, int64_t ignore_index = -100,
                                int64_t chunk_rows = 0);

}  // namespace mdl::fn
