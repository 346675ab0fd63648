// LayerNorm tuning (Zhao et al., 2023; also part of many PEFT recipes): a trainable delta on a norm's
// scale (and shift, for LayerNorm), zero at start: y = norm(x) + x_hat * dw + db, x_hat the normalised
// input. The backbone's norm stays frozen; merging adds the deltas to its weight and bias.
#pragma once

#include "mdl/modules/site_module.h"

namespace mdl {

/// A scale/shift delta at one norm site.
class LayerNormTuningImpl : public SiteModule {
 public:
  explicit LayerNormTuningImpl(NormImpl& base);
  at::Tensor forward(const at::Tensor& input, const at::Tensor& current) override;
  std::string type() const override { return "layernorm"; }
  bool can_merge() const override { return true; }
  void merge() override;
  void unmerge() override;
  at::Tensor weight;  // (C) delta of the scale
  at::Tensor bias;    // (C) delta of the shift, LayerNorm only

 private:
  NormImpl* base_;  // the site's norm, owned by the model
};
TORCH_MODULE(LayerNormTuning);

}  // namespace mdl
