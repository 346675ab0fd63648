// Llama (LlamaForCausalLM), and with the same code Mistral and Qwen2: RMSNorm, rotary positions with
// rope_theta, grouped-query attention, SwiGLU MLP, optional q/k/v biases (Qwen2), optional sliding window
// (Mistral), tied or untied embeddings; Mixtral when the config has experts: every MLP is a sparse
// mixture of SwiGLU experts (`block_sparse_moe.gate`, `block_sparse_moe.experts.N.w1/w2/w3`) behind a
// router (top-2 renormalised by default; any RouterOptions via `set_router` or the config's `mdl_router`).
#include "mdl/backbones/llama.h"

#include <ATen/ATen.h>

#include "mdl/backbones/expert_router.h"
#include "mdl/core/error.h"
#include "mdl/ops/functional.h"

namespace mdl {
namespace {

class LlamaImpl : public ModelImpl {
 public:
  explicit LlamaImpl(const ModelConfig& c) : ModelImpl(c) {
    const int64_t C = c.hidden_size, D = c.head_dim, I = c.intermediate_size;
    auto body = add_container(*this, "model");
    embed_ = body->register_module("embed_tokens", Embedding(c.vocab_size, C));
    embed_site_ = add_site({"model.embed_tokens", SiteKind::embedding, C, C, -1});
    auto layers = add_container(*body, "layers");
    for (int l = 0; l < c.n_layer; ++l) {
      const std::string p = "model.layers." + std::to_string(l);
      auto block = add_container(*layers, std::to_string(l));
      Layer L;
      L.input_norm = add_norm(*block, "input_layernorm", p + ".input_layernorm", NormImpl::Kind::rms_norm, C,
                              c.norm_eps, l);
      auto attn = add_container(*block, "self_attn");
      L.q = add_linear(*attn, "q_proj", p + ".self_attn.q_proj", C, c.n_head * D, c.qkv_bias, l);
      L.k = add_linear(*attn, "k_proj", p + ".self_attn.k_proj", C, c.n_kv_head * D, c.qkv_bias, l);
      L.v = add_linear(*attn, "v_proj", p + ".self_attn.v_proj", C, c.n_kv_head * D, c.qkv_bias, l);
      L.o = add_linear(*attn, "o_proj", p + ".self_attn.o_proj", c.n_head * D, C, c.o_bias, l);
      L.post_norm = add_norm(*block, "post_attention_layernorm", p + ".post_attention_layernorm",
                             NormImpl::Kind::rms_norm, C, c.norm_eps, l);
      if (c.num_experts > 0) {
        auto moe = add_container(*block, "block_sparse_moe");
        L.router_gate = add_linear(*moe, "gate", p + ".block_sparse_moe.gate", C, c.num_experts, false, l);
        auto experts = add_container(*moe, "experts");
        for (int64_t e = 0; e < c.num_experts; ++e) {
          const std::string ep = p + ".block_sparse_moe.experts." + std::to_string(e);
          auto expert = add_container(*experts, std::to_string(e));
          L.experts.push_back({add_linear(*expert, "w1", ep + ".w1", C, I, false, l),
                               add_linear(*expert, "w2", ep + ".w2", I, C, false, l),
                               add_linear(*expert, "w3", ep + ".w3", C, I, false, l)});
        }
      } else {
        auto mlp = add_container(*block, "mlp");
        L.gate = add_linear(*mlp, "gate_proj", p + ".mlp.gate_proj", C, I, c.mlp_bias, l);
        L.up = add_linear(*mlp, "up_proj", p + ".mlp.up_proj", C, I, c.mlp_bias, l);
        L.down = add_linear(*mlp, "down_proj", p + ".mlp.down_proj", I, C, c.mlp_bias, l);
      }
      L.attn_site = add_site({p + ".self_attn", SiteKind::sublayer, C, C, l});
      L.kv_site = add_site({p + ".self_attn.kv", SiteKind::attention_kv, C, c.n_kv_head * D, l});
      L.mlp_site =
          add_site({p + (c.num_experts > 0 ? ".block_sparse_moe" : ".mlp"), SiteKind::sublayer, C, C, l});
      L.out = add_site({p, SiteKind::hidden, C, C, l});
      if (c.num_experts > 0)
        L.moe = std::make_shared<ExpertMlp>(
            c, config_router(c), L.mlp_site->name(), "model.block_sparse_moe",
            [gate = L.router_gate](const at::Tensor& rows) mutable { return gate(rows); }, c.num_experts,
            [experts = L.experts, act = c.activation](int64_t e, const at::Tensor& rows) mutable {
              Expert& X = experts[static_cast<size_t>(e)];
              return X.w2(fn::gated_activation(X.w1(rows), X.w3(rows), act));
            });
      layers_.push_back(L);
    }
    norm_ = add_norm(*body, "norm", "model.norm", NormImpl::Kind::rms_norm, C, c.norm_eps, -1);
    build_head(embed_);
  }

  void set_router(const RouterOptions& options) override {
    if (config_.num_experts == 0) return ModelImpl::set_router(options);  // refuses, with the way out
    for (auto& L : layers_) L.moe->set_router(options);
  }
  const Router* router() const override {
    return layers_.empty() || !layers_[0].moe ? nullptr : &layers_[0].moe->policy();
  }

  at::Tensor hidden_states(const ModelInput& input) override {
    const at::Tensor& ids = input.input_ids;  // (B, T)
    const int64_t B = ids.size(0);
    const int64_t H = config_.n_head, Hkv = config_.n_kv_head, D = config_.head_dim;
    const int64_t past = input.cache ? input.cache->length() : 0;
    ModelInput in = input;
    int64_t n_virtual = 0;
    at::Tensor x = embed_with_virtual_tokens(*embed_site_, ids, embed_(ids), in, n_virtual);  // (B, T, C)
    const int64_t T = x.size(1);
    auto [cos, sin] =
        fn::rope_tables(positions(in, B, past, T).to(x.device()), D, config_.rope_theta);  // (B, 1, T, D)
    at::Tensor bias;
    if (in.attention_mask.defined() || T > 1 || config_.sliding_window > 0)
      bias = fn::attention_bias(in.attention_mask, B, T, past, true, config_.sliding_window, x.scalar_type(),
                                x.device());
    KVCache* cache = in.cache;
    for (size_t l = 0; l < layers_.size(); ++l) {
      Layer* L = &layers_[l];
      // Everything by value: a checkpointed layer runs again in backward. (C++17 captures the structured
      // bindings cos and sin only through init-captures.)
      x = run_layer(
          [this, L, l, cache, cos = cos, sin = sin, bias, B, T, H, Hkv, D](const at::Tensor& block_input) {
            at::Tensor a = L->input_norm(block_input);
            at::Tensor q = L->q(a).view({B, T, H, D}).transpose(1, 2);    // (B, H, T, D)
            at::Tensor k = L->k(a).view({B, T, Hkv, D}).transpose(1, 2);  // (B, Hkv, T, D)
            at::Tensor v = L->v(a).view({B, T, Hkv, D}).transpose(1, 2);
            q = fn::apply_rope(q, cos, sin);
            k = fn::apply_rope(k, cos, sin);
            if (cache) std::tie(k, v) = cache->append(static_cast<int>(l), k, v);
            at::Tensor layer_bias = bias;
            apply_kv_site(*L->kv_site, k, v, layer_bias);
            at::Tensor o = fn::attention(q, k, v, layer_bias).transpose(1, 2).reshape({B, T, H * D});
            at::Tensor h = block_input + L->attn_site->apply(a, L->o(o));
            at::Tensor m = L->post_norm(h);
            at::Tensor mlp = L->experts.empty()
                                 ? L->down(fn::gated_activation(L->gate(m), L->up(m), config_.activation))
                                 : L->moe->forward(m, is_training());
            h = h + L->mlp_site->apply(m, mlp);
            return L->out->apply(block_input, h);
          },
          x, cache != nullptr);
    }
    x = norm_(x);
    return n_virtual > 0 ? x.narrow(1, n_virtual, T - n_virtual) : x;
  }

 private:
  struct Expert {
    SiteLinear w1, w2, w3;  // gate (C, I), down (I, C), up (C, I)
  };
  struct Layer {
    Norm input_norm{nullptr}, post_norm{nullptr};
    SiteLinear q{nullptr}, k{nullptr}, v{nullptr}, o{nullptr}, gate{nullptr}, up{nullptr}, down{nullptr};
    SiteLinear router_gate{nullptr};  // Mixtral: (C -> E) router logits
    std::vector<Expert> experts;
    std::shared_ptr<ExpertMlp> moe;  // Mixtral: the experts behind the router
    std::shared_ptr<Site> attn_site, kv_site, mlp_site, out;
  };

  Embedding embed_{nullptr};
  Norm norm_{nullptr};
  std::shared_ptr<Site> embed_site_;
  std::vector<Layer> layers_;
};

}  // namespace

Model create_llama(const ModelConfig& config) {
  return std::make_shared<LlamaImpl>(config);
}

ArchTargets llama_targets() {
  return {{"q_proj", "v_proj"}, {"k_proj", "v_proj", "down_proj"}, {}};
}

}  // namespace mdl
