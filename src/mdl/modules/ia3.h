// (IA)^3 (Liu et al., 2022): a learned vector rescales a projection's output (keys, values), or, on
// feed-forward projections, its input (the MLP's intermediate activation). Initialised to ones.
#pragma once

#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "mdl/modules/site_module.h"

namespace mdl {

template <class T>
class FieldList;

/// (IA)^3 settings (PEFT's IA3Config names).
struct Ia3Options {
  std::vector<std::string> feedforward_modules = {"down_proj", "mlp.c_proj", "output.dense",
                                                  "fc2"};  ///< sites whose input is scaled
  bool init_ones = true;  ///< init_ia3_weights; false draws N(1, 0.1) (tests)
  /// True if `site` is a feed-forward site (suffix match).
  bool is_feedforward(const std::string& site) const;
};
void to_json(nlohmann::json& j, const Ia3Options& o);
void from_json(const nlohmann::json& j, Ia3Options& o);
/// The fields of Ia3Options: JSON keys, defaults and meanings (core/fields.h).
const FieldList<Ia3Options>& ia3_fields();

/// An (IA)^3 vector at one linear site; `ia3_l` has PEFT's shape: (out, 1), or (1, in) when feed-forward.
class Ia3Impl : public SiteModule {
 public:
  Ia3Impl(SiteLinearImpl& base, const Ia3Options& options, uint64_t seed);
  at::Tensor forward(const at::Tensor& input, const at::Tensor& current) override;
  std::string type() const override { return "ia3"; }
  bool can_merge() const override { return true; }
  void merge() override;
  void unmerge() override;
  bool feedforward;
  at::Tensor ia3_l;

 private:
  SiteLinearImpl* base_;  // owned by the model
};
TORCH_MODULE(Ia3);

}  // namespace mdl
