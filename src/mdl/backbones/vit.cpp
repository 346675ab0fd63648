// ViT (Dosovitskiy et al., 2021) as Hugging Face lays it out: the image cut into patches by a strided
// convolution (`vit.embeddings.patch_embeddings.projection`), a learned [CLS] token and absolute position
// embeddings, pre-LayerNorm encoder blocks (`layernorm_before`, `attention.attention.query`...,
// `layernorm_after`, `intermediate.dense`, `output.dense`), a final `vit.layernorm`, and for
// ViTForImageClassification a `classifier` on the [CLS] token. Sites follow BERT's names (`.attention`,
// `.attention.kv`, `.output`), so every module type attaches as it does to BERT. With experts in the
// config (mdl's upcycled ViT, `num_local_experts`), each MLP is a mixture of copies of the dense MLP
// (`vit.encoder.layer.N.moe.gate`, `...moe.experts.E.intermediate.dense`, `...moe.experts.E.output.dense`).
#include "mdl/backbones/vit.h"

#include <ATen/ATen.h>

#include "mdl/backbones/expert_router.h"
#include "mdl/core/error.h"
#include "mdl/ops/functional.h"

namespace mdl {
namespace {

class ViTImpl : public ModelImpl {
 public:
  explicit ViTImpl(const ModelConfig& c) : ModelImpl(c) {
    const int64_t C = c.hidden_size, I = c.intermediate_size, P = c.patch_size;
    MDL_CHECK(P > 0 && c.num_channels > 0 && c.image_size % P == 0, "[vit] image_size ", c.image_size,
              " must be a positive multiple of patch_size ", P, " with num_channels > 0 (got ",
              c.num_channels, ")");
    auto body = add_container(*this, "vit");
    auto emb = add_container(*body, "embeddings");
    cls_token_ = emb->register_parameter("cls_token", at::zeros({1, 1, C}));
    position_ = emb->register_parameter("position_embeddings", at::zeros({1, c.num_patches() + 1, C}));
    auto patches = add_container(*emb, "patch_embeddings");
    auto projection = add_container(*patches, "projection");
    patch_weight_ = projection->register_parameter("weight", at::zeros({C, c.num_channels, P, P}));
    patch_bias_ = projection->register_parameter("bias", at::zeros({C}));
    auto encoder = add_container(*body, "encoder");
    auto layer = add_container(*encoder, "layer");
    for (int l = 0; l < c.n_layer; ++l) {
      const std::string p = "vit.encoder.layer." + std::to_string(l);
      auto block = add_container(*layer, std::to_string(l));
      Layer L;
      L.norm_before = add_norm(*block, "layernorm_before", p + ".layernorm_before",
                               NormImpl::Kind::layer_norm, C, c.norm_eps, l);
      auto attention = add_container(*block, "attention");
      auto self = add_container(*attention, "attention");
      L.query = add_linear(*self, "query", p + ".attention.attention.query", C, C, c.qkv_bias, l);
      L.key = add_linear(*self, "key", p + ".attention.attention.key", C, C, c.qkv_bias, l);
      L.value = add_linear(*self, "value", p + ".attention.attention.value", C, C, c.qkv_bias, l);
      auto attn_out = add_container(*attention, "output");
      L.attn_dense = add_linear(*attn_out, "dense", p + ".attention.output.dense", C, C, true, l);
      L.norm_after = add_norm(*block, "layernorm_after", p + ".layernorm_after", NormImpl::Kind::layer_norm,
                              C, c.norm_eps, l);
      if (c.num_experts > 0) {
        auto moe = add_container(*block, "moe");
        L.router_gate = add_linear(*moe, "gate", p + ".moe.gate", C, c.num_experts, false, l);
        auto experts = add_container(*moe, "experts");
        for (int64_t e = 0; e < c.num_experts; ++e) {
          const std::string ep = p + ".moe.experts." + std::to_string(e);
          auto expert = add_container(*experts, std::to_string(e));
          auto inter = add_container(*expert, "intermediate");
          auto out = add_container(*expert, "output");
          L.experts.push_back({add_linear(*inter, "dense", ep + ".intermediate.dense", C, I, true, l),
                               add_linear(*out, "dense", ep + ".output.dense", I, C, true, l)});
        }
      } else {
        auto inter = add_container(*block, "intermediate");
        L.inter = add_linear(*inter, "dense", p + ".intermediate.dense", C, I, true, l);
        auto out = add_container(*block, "output");
        L.out_dense = add_linear(*out, "dense", p + ".output.dense", I, C, true, l);
      }
      L.attn_site = add_site({p + ".attention", SiteKind::sublayer, C, C, l});
      L.kv_site = add_site({p + ".attention.kv", SiteKind::attention_kv, C, C, l});
      L.mlp_site = add_site({p + ".output", SiteKind::sublayer, C, C, l});
      L.out = add_site({p, SiteKind::hidden, C, C, l});
      if (c.num_experts > 0)
        L.moe = std::make_shared<ExpertMlp>(
            c, config_router(c), L.mlp_site->name(), "vit.moe",
            [gate = L.router_gate](const at::Tensor& rows) mutable { return gate(rows); }, c.num_experts,
            [experts = L.experts, act = c.activation](int64_t e, const at::Tensor& rows) mutable {
              Expert& X = experts[static_cast<size_t>(e)];
              return X.out(fn::activation(X.inter(rows), act));
            });
      layers_.push_back(L);
    }
    norm_ = add_norm(*body, "layernorm", "vit.layernorm", NormImpl::Kind::layer_norm, C, c.norm_eps, -1);
    build_head(Embedding{nullptr});
  }

  void set_router(const RouterOptions& options) override {
    if (config_.num_experts == 0) return ModelImpl::set_router(options);  // refuses, with the way out
    for (auto& L : layers_) L.moe->set_router(options);
  }
  const Router* router() const override {
    return layers_.empty() || !layers_[0].moe ? nullptr : &layers_[0].moe->policy();
  }

  at::Tensor hidden_states(const ModelInput& in) override {
    const at::Tensor& pixels = in.pixel_values;  // (B, Ch, S, S)
    const ModelConfig& c = config_;
    MDL_CHECK(pixels.defined(), "[vit] a Vision Transformer reads images: set ModelInput::pixel_values (B, ",
              c.num_channels, ", ", c.image_size, ", ", c.image_size, ")");
    MDL_CHECK(pixels.dim() == 4 && pixels.size(1) == c.num_channels && pixels.size(2) == c.image_size &&
                  pixels.size(3) == c.image_size,
              "[vit] pixel_values must be (B, ", c.num_channels, ", ", c.image_size, ", ", c.image_size,
              "), got ", pixels.sizes());
    MDL_CHECK(in.cache == nullptr, "[vit] an encoder has no KV cache");
    const int64_t B = pixels.size(0), C = c.hidden_size, H = c.n_head, D = C / H;
    at::Tensor x =
        at::conv2d(pixels.to(patch_weight_.scalar_type()), patch_weight_, patch_bias_, {c.patch_size});
    x = x.flatten(2).transpose(1, 2);                               // (B, N, C)
    x = at::cat({cls_token_.expand({B, 1, C}), x}, 1) + position_;  // (B, T, C), T = N + 1
    const int64_t T = x.size(1);
    for (auto& layer : layers_) {
      Layer* L = &layer;
      x = run_layer(
          [this, L, B, T, C, H, D](const at::Tensor& block_input) {
            const std::string& act = config_.activation;
            at::Tensor a = L->norm_before(block_input);
            at::Tensor q = L->query(a).view({B, T, H, D}).transpose(1, 2);  // (B, H, T, D)
            at::Tensor k = L->key(a).view({B, T, H, D}).transpose(1, 2);
            at::Tensor v = L->value(a).view({B, T, H, D}).transpose(1, 2);
            at::Tensor bias;
            apply_kv_site(*L->kv_site, k, v, bias);
            at::Tensor ctx = fn::attention(q, k, v, bias).transpose(1, 2).reshape({B, T, C});
            at::Tensor h = block_input + L->attn_site->apply(a, L->attn_dense(ctx));
            at::Tensor m = L->norm_after(h);
            h = h + L->mlp_site->apply(m, L->experts.empty() ? L->out_dense(fn::activation(L->inter(m), act))
                                                             : L->moe->forward(m, is_training()));
            return L->out->apply(block_input, h);
          },
          x, false);
    }
    return norm_(x);
  }

 private:
  struct Expert {
    SiteLinear inter, out;  // (C, I), (I, C)
  };
  struct Layer {
    Norm norm_before{nullptr}, norm_after{nullptr};
    SiteLinear query{nullptr}, key{nullptr}, value{nullptr}, attn_dense{nullptr}, inter{nullptr},
        out_dense{nullptr};
    SiteLinear router_gate{nullptr};  // upcycled: (C -> E) router logits
    std::vector<Expert> experts;
    std::shared_ptr<ExpertMlp> moe;  // upcycled: the experts behind the router
    std::shared_ptr<Site> attn_site, kv_site, mlp_site, out;
  };

  at::Tensor cls_token_, position_, patch_weight_, patch_bias_;
  Norm norm_{nullptr};
  std::vector<Layer> layers_;
};

}  // namespace

Model create_vit(const ModelConfig& config) {
  return std::make_shared<ViTImpl>(config);
}

ArchTargets vit_targets() {
  // output.dense is the MLP's output; the attention's own output.dense is left alone.
  return {{"query", "value"}, {"key", "value", "output.dense"}, {"attention.output.dense"}};
}

}  // namespace mdl
