// A trainable full copy of one of the backbone's projections, used in its place while the module runs:
// PEFT's `modules_to_save` (a new task's classification head, trained and saved with the module).
#pragma once

#include "mdl/modules/site_module.h"

namespace mdl {

/// The copy of a linear site's weight (out, in) and bias (out, when the projection has one), initialised to
/// the base's values. Alone at its site it is the projection with its own weights; after other modules it
/// adds what it changes (input (W' - W)^T + b' - b), so it composes with them like any additive module.
/// Merging writes the copy into the base projection (the base's values kept to unmerge); a projection whose
/// weight is tied to the embeddings cannot be merged into.
class LayerCopyImpl : public SiteModule {
 public:
  explicit LayerCopyImpl(SiteLinearImpl& base);
  at::Tensor forward(const at::Tensor& input, const at::Tensor& current) override;
  at::Tensor forward_linear(const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& bias) override;
  std::string type() const override { return "modules_to_save"; }
  bool can_merge() const override { return !tied_; }
  void merge() override;
  void unmerge() override;
  at::Tensor weight;  // (out, in)
  at::Tensor bias;    // (out) or undefined

 private:
  SiteLinearImpl* base_;                  // owned by the model
  bool tied_;                             // the base weight is the embeddings'
  at::Tensor saved_weight_, saved_bias_;  // the base's values while merged
};
TORCH_MODULE(LayerCopy);

/// The feature axes of a copy's parameter ('o' out, 'i' in; module_type.h's feature_axes): weight "oi",
/// bias "o"; throws for other names.
std::string layer_copy_axes(const std::string& param);

}  // namespace mdl
