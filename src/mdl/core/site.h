// A site: a named place in a backbone where modular functions attach (the survey's f_phi next to f_theta).
// Backbones create one per linear projection, per block output and for the embeddings, and call
// `Site::apply` on the base result. With nothing attached a site returns the base result untouched, so
// an empty site costs one branch. What attaches (modules, a router, an aggregator: Algorithm 1's route ->
// compute -> aggregate) implements `SiteFunction`; backbones never know which.
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <string>

namespace mdl {

/// What a site computes, so attachable functions can check they fit.
enum class SiteKind {
  linear,        ///< y = W x + b; input (..., in), output (..., out)
  sublayer,      ///< an attention or MLP sublayer: input its (normed) input, output its result before the
                 ///< residual
  hidden,        ///< a block's output hidden state (B, T, C)
  embedding,     ///< token embeddings (B, T, C)
  norm,          ///< a LayerNorm / RMSNorm: input its input, output its normalised and scaled result
  attention_kv,  ///< an attention's keys and values: output stack(k, v) (2, B, Hkv, S, D); may prepend
                 ///< positions
};

/// Name and shape of a site. Names are the Hugging Face module paths
/// ("model.layers.3.self_attn.q_proj"), so PEFT's `target_modules` patterns apply unchanged.
struct SiteInfo {
  std::string name;
  SiteKind kind = SiteKind::linear;
  int64_t in_features = 0;   ///< input width (hidden size for hidden/embedding sites)
  int64_t out_features = 0;  ///< output width
  int layer = -1;            ///< block index, -1 outside the blocks
};

/// A modular function attached at a site. `input` is what the base computation consumed, `base` what it
/// produced; the result replaces `base` (and may be longer along T for input composition at embeddings).
class SiteFunction {
 public:
  virtual ~SiteFunction() = default;
  virtual at::Tensor forward(const at::Tensor& input, const at::Tensor& base) = 0;
  /// At a linear site: the projection `weight` (out, in), `bias` (out or undefined) of `input`, with this
  /// function applied. The default computes the projection, then forward(); a function may instead fold
  /// itself into the projection (a training LoRA at many rows: one GEMM with W + s B A, see lora.cpp).
  virtual at::Tensor forward_linear(const at::Tensor& input, const at::Tensor& weight,
                                    const at::Tensor& bias);
  /// Positions this function places before the sequence at an attention_kv site (prefix tuning); the
  /// backbone shifts the real tokens' positions by this many, as Hugging Face does for a prefix cache.
  virtual int64_t prefix_positions() const { return 0; }
  /// Follows the backbone into training or evaluation mode (dropout, Gumbel noise in routers).
  virtual void set_training(bool on) {}
};

/// A site of a backbone.
class Site {
 public:
  explicit Site(SiteInfo info) : info_(std::move(info)) {}

  const SiteInfo& info() const { return info_; }
  const std::string& name() const { return info_.name; }
  /// True when nothing is attached (the backbone's own computation only).
  bool empty() const { return function_ == nullptr; }
  /// Attaches a function (replacing any previous one); nullptr detaches.
  void attach(std::shared_ptr<SiteFunction> function) { function_ = std::move(function); }
  const std::shared_ptr<SiteFunction>& function() const { return function_; }

  /// The site's output: `base` when empty, else what the attached function makes of it.
  at::Tensor apply(const at::Tensor& input, const at::Tensor& base) const {
    return function_ ? function_->forward(input, base) : base;
  }
  /// A linear site's output: the projection alone when empty, else what the attached function computes.
  at::Tensor apply_linear(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias) const;
  /// See SiteFunction::prefix_positions.
  int64_t prefix_positions() const { return function_ ? function_->prefix_positions() : 0; }

 private:
  SiteInfo info_;
  std::shared_ptr<SiteFunction> function_;
};

}  // namespace mdl
