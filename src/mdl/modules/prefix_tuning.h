// Prefix tuning (Li & Liang, 2021): n learned keys and values prepended to every attention layer's keys
// and values — input composition at the attention_kv sites. As in Hugging Face, the prefix occupies
// positions 0..n-1 (real tokens are shifted by n) and is visible to every query. During training the
// prefix can be reparameterised through an MLP (prefix_projection); fold() replaces the MLP by its output.
// All layers of one module share one PrefixEncoder: (n, n_layer * 2 * kv_dim), PEFT's layout.
#pragma once

#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "mdl/modules/site_module.h"

namespace mdl {

template <class T>
class FieldList;

/// Prefix tuning settings (PEFT's PrefixTuningConfig names).
struct PrefixTuningOptions {
  int64_t num_virtual_tokens = 20;  ///< prefix length n
  bool prefix_projection = false;   ///< reparameterise through an MLP while training
  int64_t encoder_hidden_size = 0;  ///< the MLP's hidden width (0: the model's hidden size)
};
void to_json(nlohmann::json& j, const PrefixTuningOptions& o);
void from_json(const nlohmann::json& j, PrefixTuningOptions& o);
/// The fields of PrefixTuningOptions: JSON keys, defaults and meanings (core/fields.h).
const FieldList<PrefixTuningOptions>& prefix_fields();
/// Throws naming the field when a value is out of its range (its field list runs it after reading).
void validate(const PrefixTuningOptions& o);

/// Produces every layer's prefix keys and values: (n, n_layer * 2 * kv_dim). Parameter names follow PEFT:
/// embedding.weight, transform.0.{weight,bias}, transform.2.{weight,bias}.
class PrefixEncoderImpl : public torch::nn::Module {
 public:
  PrefixEncoderImpl(int64_t n, int64_t n_layer, int64_t hidden, int64_t kv_dim,
                    const PrefixTuningOptions& options, uint64_t seed, c10::TensorOptions dtype);
  /// (n, n_layer * 2 * kv_dim)
  at::Tensor all() const;
  int64_t n, n_layer, kv_dim;
  bool projection;
  at::Tensor embedding, w0, b0, w2, b2;
};
TORCH_MODULE(PrefixEncoder);

/// One layer's view of a prefix module.
class PrefixTuningImpl : public SiteModule {
 public:
  /// `owner`: this part registers the shared encoder (so its parameters are counted and saved once).
  PrefixTuningImpl(const SiteInfo& site, int64_t head_dim, std::shared_ptr<PrefixEncoderImpl> encoder,
                   bool owner);
  /// current: stack(k, v) (2, B, Hkv, S, D) -> (2, B, Hkv, n + S, D)
  at::Tensor forward(const at::Tensor& input, const at::Tensor& current) override;
  std::string type() const override { return "prefix"; }
  int64_t prefix_positions() const override { return encoder_->n; }
  /// Swaps in another encoder (after folding).
  void set_encoder(std::shared_ptr<PrefixEncoderImpl> encoder);
  const std::shared_ptr<PrefixEncoderImpl>& encoder() const { return encoder_; }

 private:
  int layer_;
  int64_t head_dim_;
  bool owner_;
  std::shared_ptr<PrefixEncoderImpl> encoder_;
};
TORCH_MODULE(PrefixTuning);

}  // namespace mdl
