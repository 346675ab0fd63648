// LoRA (Hu et al., 2021) at a linear site: y = W x + b + s (B A dropout(x) + c), A (r, in), B (out, r),
// optional bias c, s = alpha / r, or alpha / sqrt(r) with rsLoRA. DoRA (Liu et al., 2024) rescales each
// output row: y = m / ||W + s B A||_row * (W + s B A) x + b, with the norm detached as in the paper and PEFT.
#pragma once

#include <map>
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "mdl/modules/site_module.h"

namespace mdl {

template <class T>
class FieldList;

/// LoRA settings (PEFT's LoraConfig names and defaults).
struct LoraOptions {
  int64_t r = 8;                 ///< rank
  double alpha = 8;              ///< lora_alpha
  double dropout = 0.0;          ///< lora_dropout on the module's input, training only
  bool use_rslora = false;       ///< scaling alpha / sqrt(r) instead of alpha / r
  bool use_dora = false;         ///< weight-decomposed LoRA (magnitude vector)
  std::string init = "kaiming";  ///< A's init: kaiming (uniform, PEFT's default) | gaussian (N(0, 1/r))
  bool bias = false;             ///< a trainable bias on B (PEFT lora_bias)
  std::map<std::string, int64_t> rank_pattern;  ///< site regex -> rank
  std::map<std::string, double> alpha_pattern;  ///< site regex -> alpha

  /// Rank and alpha for a site after the patterns.
  std::pair<int64_t, double> rank_alpha_for(const std::string& site) const;
  double scaling(int64_t rank, double alpha_value) const;
};
void to_json(nlohmann::json& j, const LoraOptions& o);
void from_json(const nlohmann::json& j, LoraOptions& o);
/// The fields of LoraOptions: JSON keys, defaults and meanings (core/fields.h).
const FieldList<LoraOptions>& lora_fields();
/// Throws naming the field when a value is out of its range (its field list runs it after reading).
void validate(const LoraOptions& o);

/// A LoRA module at one linear site.
class LoraImpl : public SiteModule {
 public:
  /// `base` is the site's projection (its weight initialises DoRA's magnitude; it is never modified here).
  LoraImpl(SiteLinearImpl& base, const LoraOptions& options, uint64_t seed);
  at::Tensor forward(const at::Tensor& input, const at::Tensor& current) override;
  /// Plain LoRA on enough rows (and without dropout in training) computes x (W + s B A)^T + b: one GEMM
  /// of the projection's size where the low-rank route takes the projection plus two thin GEMMs and an
  /// add. The merged weight lives for this call only; the base weights are never modified.
  at::Tensor forward_linear(const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& bias) override;
  std::string type() const override { return "lora"; }
  bool can_merge() const override { return true; }
  void merge() override;
  void unmerge() override;
  /// s B A (out, in), the dense weight delta.
  at::Tensor delta_weight() const;
  /// Plain LoRA (no DoRA, no bias, no dropout in training) has a gatherable low-rank change.
  bool low_rank(at::Tensor& a, at::Tensor& b, double& s) const override;

  int64_t rank;
  double alpha;
  double scaling;
  LoraOptions options;
  at::Tensor A;          // (r, in)
  at::Tensor B;          // (out, r)
  at::Tensor lora_bias;  // (out) or undefined
  at::Tensor magnitude;  // (out) DoRA or undefined

 private:
  /// No DoRA magnitude and no LoRA bias: y = W x + s B A x, which the fused nodes compute.
  bool plain() const { return !magnitude.defined() && !lora_bias.defined(); }
  SiteLinearImpl* base_;     // the site's projection, owned by the model
  at::Tensor merged_scale_;  // DoRA: m / ||W + sBA|| at merge time, to unmerge exactly
};
TORCH_MODULE(Lora);

}  // namespace mdl
