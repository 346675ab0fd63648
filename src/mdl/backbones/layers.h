// The weight-holding building blocks every architecture is composed of: a linear projection that is a
// site, a normalisation layer and an embedding table. Parameter names are those of PyTorch/HF
// (`weight`, `bias`), so a block's parameters carry the checkpoint's tensor names.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <memory>
#include <string>

#include "mdl/core/site.h"

namespace mdl {

/// y = x W^T + b at a site. Weight (out, in) whatever the checkpoint's layout (GPT-2's Conv1D stores
/// (in, out); the loader transposes). A tied projection reuses another module's weight (LM head).
class SiteLinearImpl : public torch::nn::Module {
 public:
  SiteLinearImpl(SiteInfo info, bool bias, at::Tensor tied_weight = {});
  /// x (..., in) -> (..., out)
  at::Tensor forward(const at::Tensor& x);
  /// The base projection alone, without what is attached at the site.
  at::Tensor forward_base(const at::Tensor& x);
  const std::shared_ptr<Site>& site() const { return site_; }
  at::Tensor weight;  // (out, in)
  at::Tensor bias;    // (out) or undefined
 private:
  std::shared_ptr<Site> site_;
};
TORCH_MODULE(SiteLinear);

/// LayerNorm (weight and bias) or RMSNorm (weight only), a site when given one.
class NormImpl : public torch::nn::Module {
 public:
  enum class Kind { layer_norm, rms_norm };
  NormImpl(Kind kind, int64_t dim, double eps, SiteInfo info = {});
  at::Tensor forward(const at::Tensor& x);
  /// The normalisation without the learned scale and shift (what LayerNorm tuning modules scale).
  at::Tensor normalize(const at::Tensor& x) const;
  const std::shared_ptr<Site>& site() const { return site_; }
  Kind kind;
  double eps;
  at::Tensor weight;
  at::Tensor bias;

 private:
  std::shared_ptr<Site> site_;  // null when the norm is not a site
};
TORCH_MODULE(Norm);

/// An embedding table (num, dim) named `weight`.
class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t num, int64_t dim);
  /// ids (B, T) -> (B, T, dim); ids out of range are an error naming the range.
  at::Tensor forward(const at::Tensor& ids);
  at::Tensor weight;
};
TORCH_MODULE(Embedding);

}  // namespace mdl
