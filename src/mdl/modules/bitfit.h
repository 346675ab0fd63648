// BitFit: a trainable change to a projection's bias, the rest of the model frozen.
#pragma once

#include "mdl/modules/site_module.h"

namespace mdl {

/// BitFit (Ben Zaken et al., 2022) as a module: a trainable delta on a linear site's bias (zero at start),
/// so the backbone stays frozen and the delta can be merged into the bias.
class BiasDeltaImpl : public SiteModule {
 public:
  BiasDeltaImpl(SiteLinearImpl& base);
  at::Tensor forward(const at::Tensor& input, const at::Tensor& current) override { return current + bias; }
  std::string type() const override { return "bitfit"; }
  bool can_merge() const override { return base_->bias.defined(); }
  void merge() override;
  void unmerge() override;
  at::Tensor bias;  // (out)

 private:
  SiteLinearImpl* base_;  // owned by the model
};
TORCH_MODULE(BiasDelta);

}  // namespace mdl
