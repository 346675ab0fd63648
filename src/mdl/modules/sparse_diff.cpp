#include "mdl/modules/sparse_diff.h"

#include <ATen/ATen.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "mdl/backbones/model.h"
#include "mdl/core/error.h"
#include "mdl/core/fields.h"

namespace mdl {

void to_json(nlohmann::json& j, const SparseOptions& o) {
  j = sparse_fields().write(o);
}

const FieldList<SparseOptions>& sparse_fields() {
  static const FieldList<SparseOptions> f =
      FieldList<SparseOptions>("sparse")
          .add("density", &SparseOptions::density,
               "fraction of each targeted weight's entries that are trained")
          .check([](const SparseOptions& o) { validate(o); });
  return f;
}

void validate(const SparseOptions& o) {
  MDL_CHECK(o.density > 0 && o.density <= 1, "[sparse] density must be in (0, 1], got ", o.density);
}

void from_json(const nlohmann::json& j, SparseOptions& o) {
  o = sparse_fields().read(j);
}

SparseDiffImpl::SparseDiffImpl(SiteLinearImpl& base, at::Tensor idx)
    : base_(&base), out_(base.weight.size(0)), in_(base.weight.size(1)) {
  const std::string& site = base.site()->name();
  MDL_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, "[sparse] indices for '", site,
            "' must be a 1-D int64 tensor, got ", idx.sizes(), " ", c10::toString(idx.scalar_type()));
  if (idx.numel() > 0) {
    MDL_CHECK(idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < out_ * in_,
              "[sparse] indices for '", site, "' must be in [0, ", out_ * in_, ") for its (", out_, ", ", in_,
              ") weight; a module for another base?");
  }
  indices = register_buffer("indices", idx.to(base.weight.device()));
  values = register_parameter("values", at::zeros({idx.numel()}, base.weight.options()));
}

at::Tensor SparseDiffImpl::delta_weight() const {
  at::Tensor flat = at::zeros({out_ * in_}, values.options());
  return flat.index_add(0, indices, values).view({out_, in_});  // differentiable in `values`
}

at::Tensor SparseDiffImpl::forward(const at::Tensor& input, const at::Tensor& current) {
  return current + at::linear(input, delta_weight());
}

void SparseDiffImpl::merge() {
  torch::NoGradGuard g;
  base_->weight.view({-1}).index_add_(0, indices, values.to(base_->weight.scalar_type()));
}

void SparseDiffImpl::unmerge() {
  torch::NoGradGuard g;
  base_->weight.view({-1}).index_add_(0, indices, -values.to(base_->weight.scalar_type()));
}

at::Tensor select_top_indices(const at::Tensor& scores, double density) {
  MDL_CHECK(density > 0 && density <= 1, "[sparse] density must be in (0, 1], got ", density);
  at::Tensor flat = scores.detach().reshape({-1}).to(at::kFloat);
  const int64_t k = std::max<int64_t>(1, static_cast<int64_t>(std::llround(density * flat.numel())));
  at::Tensor idx = std::get<1>(flat.topk(std::min(k, flat.numel())));
  return std::get<0>(idx.sort());
}

std::map<std::string, at::Tensor> change_scores(const ModelImpl& base, const ModelImpl& tuned) {
  MDL_CHECK(base.config().architecture == tuned.config().architecture, "[sparse] warm-up model is a ",
            tuned.config().architecture, ", the base a ", base.config().architecture);
  std::map<std::string, at::Tensor> out;
  for (const auto& site : base.sites()) {
    if (site->info().kind != SiteKind::linear) continue;
    const at::Tensor& a = base.linear(site->name()).weight;
    const at::Tensor& b = tuned.linear(site->name()).weight;
    MDL_CHECK(a.sizes() == b.sizes(), "[sparse] '", site->name(), "' is ", a.sizes(), " in the base and ",
              b.sizes(), " in the warm-up model");
    out[site->name()] = (b.detach() - a.detach()).abs();
  }
  return out;
}

std::map<std::string, at::Tensor> fisher_scores(ModelImpl& model, int64_t batches,
                                                const std::function<at::Tensor(int64_t)>& loss_of) {
  MDL_CHECK(batches > 0, "[sparse] fisher_scores needs at least one batch");
  std::vector<std::pair<at::Tensor, bool>> flags;
  for (auto& p : model.parameters()) flags.emplace_back(p, p.requires_grad());
  std::map<std::string, at::Tensor> scores;
  for (const auto& site : model.sites()) {
    if (site->info().kind != SiteKind::linear) continue;
    at::Tensor w = model.linear(site->name()).weight;
    w.set_requires_grad(true);
    scores[site->name()] = at::zeros(w.sizes(), w.options().dtype(at::kFloat));
  }
  for (int64_t i = 0; i < batches; ++i) {
    for (auto& p : model.parameters()) p.mutable_grad() = at::Tensor();
    at::Tensor loss = loss_of(i);
    MDL_CHECK(loss.numel() == 1, "[sparse] fisher_scores: the loss must be a scalar, got ", loss.sizes());
    loss.backward();
    for (auto& [name, score] : scores) {
      const at::Tensor& g = model.linear(name).weight.grad();
      if (g.defined()) score.add_(g.detach().to(at::kFloat).pow(2) / static_cast<double>(batches));
    }
  }
  for (auto& p : model.parameters()) p.mutable_grad() = at::Tensor();
  for (auto& [p, flag] : flags) p.set_requires_grad(flag);
  return scores;
}

}  // namespace mdl
