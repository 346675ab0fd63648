// Prompt tuning (Lester et al., 2021): n learned vectors prepended to the token embeddings — input
// composition at the embedding site. The backbone extends masks and positions over them and drops them
// from its outputs, so logits stay aligned with the input tokens. In a cached generation they are
// prepended on the first pass only (ForwardContext::past == 0) and stay in the KV cache.
#pragma once

#include <nlohmann/json_fwd.hpp>
#include <string>

#include "mdl/modules/site_module.h"

namespace mdl {

template <class T>
class FieldList;

/// Prompt tuning settings (PEFT's PromptTuningConfig names).
struct PromptTuningOptions {
  int64_t num_virtual_tokens = 20;  ///< prompt length n
  std::string init = "vocab";  ///< vocab: copies of random rows of the embedding table | random: N(0, 0.02)
};
void to_json(nlohmann::json& j, const PromptTuningOptions& o);
void from_json(const nlohmann::json& j, PromptTuningOptions& o);
/// The fields of PromptTuningOptions: JSON keys, defaults and meanings (core/fields.h).
const FieldList<PromptTuningOptions>& prompt_fields();
/// Throws naming the field when a value is out of its range (its field list runs it after reading).
void validate(const PromptTuningOptions& o);

/// A soft prompt at the embedding site; parameter `prompt_embeddings` (n, C) as PEFT names it.
class PromptTuningImpl : public SiteModule {
 public:
  /// `embeddings` is the backbone's token embedding table (V, C), used by the vocab init.
  PromptTuningImpl(const SiteInfo& site, const PromptTuningOptions& options, const at::Tensor& embeddings,
                   uint64_t seed);
  /// input: token ids (B, T); current: embeddings (B, T, C) -> (B, n + T, C) on a fresh pass.
  at::Tensor forward(const at::Tensor& input, const at::Tensor& current) override;
  std::string type() const override { return "prompt"; }
  at::Tensor prompt_embeddings;  // (n, C)
};
TORCH_MODULE(PromptTuning);

}  // namespace mdl
