// Compacter (Karimi Mahabadi et al., 2021): a bottleneck adapter whose projections are parameterised
// hypercomplex multiplications, W = sum_i A_i (x) (s_i t_i): the n x n "slow" rule matrices A_i are shared by
// every layer of the module, the factors s_i (in/n, r) and t_i (r, out/n) are per layer. Placed as Pfeiffer
// (after the MLP: Compacter++) or Houlsby (after attention and MLP: Compacter).
#pragma once

#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "mdl/modules/site_module.h"

namespace mdl {

template <class T>
class FieldList;

/// Compacter settings (AdapterHub's CompacterConfig names where they exist).
struct CompacterOptions {
  std::string config = "pfeiffer";  ///< pfeiffer (Compacter++) | houlsby (Compacter)
  /// bottleneck = hidden / reduction_factor, rounded to a multiple of phm_dim
  int64_t reduction_factor = 32;
  int64_t phm_dim = 4;                 ///< n: number of Kronecker terms and size of the rule matrices
  int64_t phm_rank = 1;                ///< r: rank of the per-layer factors
  std::string non_linearity = "gelu";  ///< relu | gelu | silu | tanh
};
void to_json(nlohmann::json& j, const CompacterOptions& o);
void from_json(const nlohmann::json& j, CompacterOptions& o);
/// The fields of CompacterOptions: JSON keys, defaults and meanings (core/fields.h).
const FieldList<CompacterOptions>& compacter_fields();
/// Throws naming the field when a value is out of its range (its field list runs it after reading).
void validate(const CompacterOptions& o);

/// The rule matrices shared by all layers: phm_rule_down and phm_rule_up, each (n, n, n).
class PhmRulesImpl : public torch::nn::Module {
 public:
  PhmRulesImpl(int64_t n, uint64_t seed, c10::TensorOptions dtype);
  at::Tensor down, up;
};
TORCH_MODULE(PhmRules);

/// W (in, out) = sum_i kron(rule_i, left_i @ right_i); rule (n, n, n), left (n, in/n, r), right (n, r,
/// out/n).
at::Tensor phm_weight(const at::Tensor& rule, const at::Tensor& left, const at::Tensor& right);

/// One Compacter adapter at one sublayer site.
class CompacterImpl : public SiteModule {
 public:
  CompacterImpl(const SiteInfo& site, const CompacterOptions& options, std::shared_ptr<PhmRulesImpl> rules,
                bool owner, uint64_t seed, c10::TensorOptions dtype);
  at::Tensor forward(const at::Tensor& input, const at::Tensor& current) override;
  std::string type() const override { return "compacter"; }
  CompacterOptions options;
  int64_t bottleneck;
  at::Tensor down_left, down_right, down_bias, up_left, up_right, up_bias;

 private:
  std::shared_ptr<PhmRulesImpl> rules_;
};
TORCH_MODULE(Compacter);

}  // namespace mdl
