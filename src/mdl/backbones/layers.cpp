#include "mdl/backbones/layers.h"

#include <ATen/ATen.h>

#include "mdl/core/error.h"
#include "mdl/core/linear.h"
#include "mdl/ops/functional.h"

namespace mdl {

SiteLinearImpl::SiteLinearImpl(SiteInfo info, bool with_bias, at::Tensor tied_weight)
    : site_(std::make_shared<Site>(info)) {
  if (tied_weight.defined()) {
    weight = tied_weight;  // owned and registered by the embedding
  } else {
    weight = register_parameter("weight", at::zeros({info.out_features, info.in_features}));
  }
  if (with_bias) bias = register_parameter("bias", at::zeros({info.out_features}));
}

namespace {
void check_features(const Site& site, const at::Tensor& x, const at::Tensor& weight) {
  MDL_CHECK(x.size(-1) == weight.size(1), "[", site.name(), "] input has ", x.size(-1),
            " features, the projection expects ", weight.size(1));
}
}  // namespace

at::Tensor SiteLinearImpl::forward_base(const at::Tensor& x) {
  check_features(*site_, x, weight);
  return linear(x, weight, bias);
}

at::Tensor SiteLinearImpl::forward(const at::Tensor& x) {
  check_features(*site_, x, weight);
  return site_->apply_linear(x, weight, bias);
}

NormImpl::NormImpl(Kind kind_, int64_t dim, double eps_, SiteInfo info) : kind(kind_), eps(eps_) {
  weight = register_parameter("weight", at::ones({dim}));
  if (kind == Kind::layer_norm) bias = register_parameter("bias", at::zeros({dim}));
  if (!info.name.empty()) site_ = std::make_shared<Site>(std::move(info));
}

at::Tensor NormImpl::forward(const at::Tensor& x) {
  at::Tensor y = kind == Kind::rms_norm ? fn::rms_norm(x, weight, eps) : fn::layer_norm(x, weight, bias, eps);
  return site_ ? site_->apply(x, y) : y;
}

at::Tensor NormImpl::normalize(const at::Tensor& x) const {
  if (kind == Kind::rms_norm) return fn::rms_norm(x, at::ones_like(weight), eps);
  return at::layer_norm(x, {x.size(-1)}, {}, {}, eps);
}

EmbeddingImpl::EmbeddingImpl(int64_t num, int64_t dim) {
  weight = register_parameter("weight", at::zeros({num, dim}));
}

at::Tensor EmbeddingImpl::forward(const at::Tensor& ids) {
  if (ids.numel() > 0) {
    const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
    MDL_CHECK(lo >= 0 && hi < weight.size(0), "[embedding] token ids must be in [0, ", weight.size(0),
              "), found ", lo < 0 ? lo : hi, "; a tokenizer from another model?");
  }
  return at::embedding(weight, ids);
}

}  // namespace mdl
