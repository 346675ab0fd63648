#include "mdl/ops/functional.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "mdl/core/error.h"
#include "mdl/ops/fused_ops.h"

namespace mdl::fn {

std::pair<at::Tensor, at::Tensor> rope_tables(const at::Tensor& positions, int64_t head_dim, double theta) {
  auto f32 = at::TensorOptions().dtype(at::kFloat).device(positions.device());
  at::Tensor inv_freq = 1.0 / at::pow(theta, at::arange(0, head_dim, 2, f32) / static_cast<double>(head_dim));
  at::Tensor freqs = positions.to(at::kFloat).unsqueeze(-1) * inv_freq;  // (B, T, D/2)
  at::Tensor emb = at::cat({freqs, freqs}, -1).unsqueeze(1);             // (B, 1, T, D)
  return {emb.cos(), emb.sin()};
}

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  if (rope_fusable(x, cos, sin)) return rope_fused(x, cos, sin);  // one pass; same values
  const int64_t half = x.size(-1) / 2;
  at::Tensor x1 = x.narrow(-1, 0, half);
  at::Tensor x2 = x.narrow(-1, half, half);
  at::Tensor rotated = at::cat({-x2, x1}, -1);  // (B, H, T, D)
  return (x * cos.to(x.scalar_type())) + (rotated * sin.to(x.scalar_type()));
}

at::Tensor attention_bias(const at::Tensor& key_mask, int64_t batch, int64_t query_len, int64_t past,
                          bool causal, int64_t sliding_window, c10::ScalarType dtype, c10::Device device) {
  const int64_t keys = past + query_len;
  auto opts = at::TensorOptions().device(device);
  at::Tensor allowed = at::ones({batch, 1, query_len, keys}, opts.dtype(at::kBool));  // (B, 1, T, S)
  if (causal || sliding_window > 0) {
    at::Tensor q_pos = at::arange(past, keys, opts.dtype(at::kLong)).unsqueeze(1);  // (T, 1)
    at::Tensor k_pos = at::arange(0, keys, opts.dtype(at::kLong)).unsqueeze(0);     // (1, S)
    at::Tensor ok = at::ones({query_len, keys}, opts.dtype(at::kBool));
    if (causal) ok = ok.logical_and(k_pos <= q_pos);
    if (sliding_window > 0) ok = ok.logical_and(q_pos - k_pos < sliding_window);
    allowed = allowed.logical_and(ok);
  }
  if (key_mask.defined()) {
    MDL_CHECK(key_mask.dim() == 2 && key_mask.size(0) == batch && key_mask.size(1) == keys,
              "[attention] attention_mask must be (batch, cached + new tokens) = (", batch, ", ", keys,
              "), got ", key_mask.sizes());
    allowed = allowed.logical_and(key_mask.to(device).to(at::kBool).view({batch, 1, 1, keys}));
  }
  // A query that may see no key at all (a padding position) attends to itself: its output is ignored, and
  // this keeps it finite, so it cannot poison later layers through 0 * NaN.
  at::Tensor none = allowed.any(-1, /*keepdim=*/true).logical_not();  // (B, 1, T, 1)
  at::Tensor self = at::arange(0, keys, opts.dtype(at::kLong)).unsqueeze(0) ==
                    at::arange(past, keys, opts.dtype(at::kLong)).unsqueeze(1);  // (T, S)
  allowed = allowed.logical_or(none.logical_and(self));
  at::Tensor bias = at::zeros({batch, 1, query_len, keys}, opts.dtype(dtype));
  // -inf is safe: every row keeps at least one key (above), so no softmax row is all -inf.
  return bias.masked_fill(allowed.logical_not(), -std::numeric_limits<float>::infinity());
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  MDL_CHECK(H % Hkv == 0, "[attention] ", H, " query heads are not a multiple of ", Hkv, " key/value heads");
  MDL_CHECK(!bias.defined() || (bias.dim() == 4 && (bias.size(1) == 1 || bias.size(1) == H)),
            "[attention] bias must be (B, 1 or H, T, S), got ", bias.sizes());
  MDL_CHECK(k.size(0) == B && v.sizes() == k.sizes() && k.size(3) == D, "[attention] q ", q.sizes(), ", k ",
            k.sizes(), " and v ", v.sizes(), " do not fit: expected (B, H, T, D) and (B, Hkv, S, D) twice");
  MDL_CHECK(!bias.defined() || ((bias.size(0) == B || bias.size(0) == 1) &&
                                (bias.size(2) == T || bias.size(2) == 1) && bias.size(3) == S),
            "[attention] bias ", bias.sizes(), " does not fit ", B, " examples, ", T, " queries and ", S,
            " keys");
  // Grouped heads stacked along T, and with a gradient one node that computes its probabilities again in
  // backward: see fused_ops.cpp.
  return attention_recomputed(q, k, v, bias);
}

at::Tensor activation(const at::Tensor& x, const std::string& name) {
  if (name == "gelu") return at::gelu(x);
  if (name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "gelu_fast") return at::gelu(x, "tanh");
  if (name == "silu" || name == "swish") return at::silu(x);
  if (name == "relu") return at::relu(x);
  MDL_FAIL("[activation] unknown activation '", name, "'");
}

at::Tensor gated_activation(const at::Tensor& gate, const at::Tensor& up, const std::string& name) {
  if (name == "silu" || name == "swish") return swiglu(gate, up);
  return activation(gate, name) * up;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  // One implementation with and without a gradient: a checkpointed layer's first run (no gradient) and
  // its rerun in backward must compute the same values, to the last bit.
  return rms_norm_fused(x, weight, eps);
}

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  return at::layer_norm(x, {x.size(-1)}, weight, bias, eps);
}

}  // namespace mdl::fn
