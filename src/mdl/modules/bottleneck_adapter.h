// Bottleneck adapters at sublayer sites: down-projection to hidden / reduction_factor, a non-linearity,
// up-projection. Sequential (Pfeiffer: after the MLP; Houlsby: after attention and after the MLP):
// h' = h + up(act(down(LN?(h)))). Parallel (He et al.): the MLP output plus s * up(act(down(x))) of the
// MLP's input x. The up-projection starts at zero, so a new adapter is the identity.
#pragma once

#include <nlohmann/json_fwd.hpp>
#include <string>

#include "mdl/modules/site_module.h"

namespace mdl {

template <class T>
class FieldList;

/// Bottleneck adapter settings.
struct AdapterOptions {
  std::string config = "pfeiffer";     ///< pfeiffer | houlsby | parallel
  int64_t reduction_factor = 16;       ///< bottleneck = hidden / reduction_factor (at least 1)
  std::string non_linearity = "relu";  ///< relu | gelu | silu | tanh
  bool residual = true;                ///< sequential adapters add their input back
  bool layer_norm = false;             ///< a LayerNorm on the adapter's input
  double scaling = 1.0;                ///< parallel adapters' s (He et al. use 4)
};
void to_json(nlohmann::json& j, const AdapterOptions& o);
void from_json(const nlohmann::json& j, AdapterOptions& o);
/// The fields of AdapterOptions: JSON keys, defaults and meanings (core/fields.h).
const FieldList<AdapterOptions>& adapter_fields();
/// Throws naming the field when a value is out of its range (its field list runs it after reading).
void validate(const AdapterOptions& o);

/// One adapter at one sublayer site. Parameter names follow AdapterHub: adapter_down.0.{weight,bias},
/// adapter_up.{weight,bias}.
class BottleneckAdapterImpl : public SiteModule {
 public:
  BottleneckAdapterImpl(const SiteInfo& site, const AdapterOptions& options, uint64_t seed,
                        c10::TensorOptions dtype);
  at::Tensor forward(const at::Tensor& input, const at::Tensor& current) override;
  std::string type() const override { return "adapter"; }
  AdapterOptions options;
  int64_t bottleneck;
  at::Tensor down_w, down_b, up_w, up_b, norm_w, norm_b;
};
TORCH_MODULE(BottleneckAdapter);

}  // namespace mdl
