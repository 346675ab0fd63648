#include "mdl/modules/prefix_tuning.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/core/fields.h"

namespace mdl {

void to_json(nlohmann::json& j, const PrefixTuningOptions& o) {
  j = prefix_fields().write(o);
}

const FieldList<PrefixTuningOptions>& prefix_fields() {
  static const FieldList<PrefixTuningOptions> f =
      FieldList<PrefixTuningOptions>("prefix")
          .add("num_virtual_tokens", &PrefixTuningOptions::num_virtual_tokens, "prefix length n")
          .add("prefix_projection", &PrefixTuningOptions::prefix_projection,
               "reparameterise through an MLP while training")
          .add(
              "encoder_hidden_size",
              [](nlohmann::json& v, const PrefixTuningOptions& o) { v = o.encoder_hidden_size; },
              [](const nlohmann::json& v, PrefixTuningOptions& o) {
                if (v.is_number_integer()) o.encoder_hidden_size = v.get<int64_t>();
              },
              "the MLP's hidden width (0 or null: the model's hidden size)")
          .check([](const PrefixTuningOptions& o) { validate(o); });
  return f;
}

void validate(const PrefixTuningOptions& o) {
  MDL_CHECK(o.num_virtual_tokens > 0, "[prefix] num_virtual_tokens must be > 0, got ", o.num_virtual_tokens);
}

void from_json(const nlohmann::json& j, PrefixTuningOptions& o) {
  o = prefix_fields().read(j);
}

PrefixEncoderImpl::PrefixEncoderImpl(int64_t n_, int64_t n_layer_, int64_t hidden, int64_t kv_dim_,
                                     const PrefixTuningOptions& o, uint64_t seed, c10::TensorOptions dtype)
    : n(n_), n_layer(n_layer_), kv_dim(kv_dim_), projection(o.prefix_projection) {
  auto gen = at::detail::createCPUGenerator(seed);
  const int64_t out = n_layer * 2 * kv_dim;
  auto emb = register_module("embedding", std::make_shared<torch::nn::Module>("embedding"));
  if (!projection) {
    embedding = emb->register_parameter("weight", at::empty({n, out}).normal_(0.0, 0.02, gen).to(dtype));
    return;
  }
  const int64_t h = o.encoder_hidden_size > 0 ? o.encoder_hidden_size : hidden;
  embedding = emb->register_parameter("weight", at::empty({n, hidden}).normal_(0.0, 1.0, gen).to(dtype));
  auto transform = register_module("transform", std::make_shared<torch::nn::Module>("transform"));
  auto l0 = transform->register_module("0", std::make_shared<torch::nn::Module>("0"));
  auto l2 = transform->register_module("2", std::make_shared<torch::nn::Module>("2"));
  const double b_in = 1.0 / std::sqrt(double(hidden)), b_h = 1.0 / std::sqrt(double(h));
  w0 = l0->register_parameter("weight", at::empty({h, hidden}).uniform_(-b_in, b_in, gen).to(dtype));
  b0 = l0->register_parameter("bias", at::zeros({h}, dtype));
  w2 = l2->register_parameter("weight", at::empty({out, h}).uniform_(-b_h, b_h, gen).to(dtype) * 0.02);
  b2 = l2->register_parameter("bias", at::zeros({out}, dtype));
}

at::Tensor PrefixEncoderImpl::all() const {
  if (!projection) return embedding;
  return at::linear(at::tanh(at::linear(embedding, w0, b0)), w2, b2);  // (n, n_layer * 2 * kv_dim)
}

PrefixTuningImpl::PrefixTuningImpl(const SiteInfo& site, int64_t head_dim,
                                   std::shared_ptr<PrefixEncoderImpl> encoder, bool owner)
    : layer_(site.layer), head_dim_(head_dim), owner_(owner), encoder_(std::move(encoder)) {
  MDL_CHECK(site.kind == SiteKind::attention_kv, "[prefix] '", site.name,
            "' is not an attention key/value site");
  MDL_CHECK(layer_ >= 0 && layer_ < encoder_->n_layer, "[prefix] site '", site.name, "' is layer ", layer_,
            " of a prefix for ", encoder_->n_layer, " layers");
  if (owner_) register_module("encoder", encoder_);
}

void PrefixTuningImpl::set_encoder(std::shared_ptr<PrefixEncoderImpl> encoder) {
  encoder_ = std::move(encoder);
  if (owner_) replace_module("encoder", encoder_);
}

at::Tensor PrefixTuningImpl::forward(const at::Tensor& input, const at::Tensor& current) {
  const int64_t n = encoder_->n, B = current.size(1), Hkv = current.size(2);
  // PEFT: (n, L * 2 * Hkv * D) -> (n, L * 2, Hkv, D); layer l's keys are slot 2l, its values 2l + 1.
  at::Tensor all = encoder_->all().view({n, encoder_->n_layer * 2, Hkv, head_dim_});
  at::Tensor kv = all.narrow(1, 2 * layer_, 2).permute({1, 2, 0, 3});  // (2, Hkv, n, D)
  kv = kv.unsqueeze(1).expand({2, B, Hkv, n, head_dim_}).to(current.scalar_type());
  return at::cat({kv, current}, 3);  // (2, B, Hkv, n + S, D)
}

}  // namespace mdl
