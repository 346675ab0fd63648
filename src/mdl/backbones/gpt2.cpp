// GPT-2 (GPT2LMHeadModel): learned positions, pre-LayerNorm blocks, fused q/k/v projection, GELU MLP.
// Its Conv1D weights are stored (in, out) on disk; they are registered as conv1d so the loader transposes.
#include "mdl/backbones/gpt2.h"

#include <ATen/ATen.h>

#include "mdl/core/error.h"
#include "mdl/ops/functional.h"

namespace mdl {
namespace {

class Gpt2Impl : public ModelImpl {
 public:
  explicit Gpt2Impl(const ModelConfig& c) : ModelImpl(c) {
    const int64_t C = c.hidden_size;
    auto body = add_container(*this, "transformer");
    wte_ = body->register_module("wte", Embedding(c.vocab_size, C));
    wpe_ = body->register_module("wpe", Embedding(c.max_position, C));
    embed_site_ = add_site({"transformer.wte", SiteKind::embedding, C, C, -1});
    auto h = add_container(*body, "h");
    for (int l = 0; l < c.n_layer; ++l) {
      const std::string p = "transformer.h." + std::to_string(l);
      auto block = add_container(*h, std::to_string(l));
      Layer L;
      L.ln_1 = add_norm(*block, "ln_1", p + ".ln_1", NormImpl::Kind::layer_norm, C, c.norm_eps, l);
      auto attn = add_container(*block, "attn");
      L.c_attn = add_linear(*attn, "c_attn", p + ".attn.c_attn", C, 3 * C, true, l, /*conv1d=*/true);
      L.attn_proj = add_linear(*attn, "c_proj", p + ".attn.c_proj", C, C, true, l, true);
      L.ln_2 = add_norm(*block, "ln_2", p + ".ln_2", NormImpl::Kind::layer_norm, C, c.norm_eps, l);
      auto mlp = add_container(*block, "mlp");
      L.c_fc = add_linear(*mlp, "c_fc", p + ".mlp.c_fc", C, c.intermediate_size, true, l, true);
      L.mlp_proj = add_linear(*mlp, "c_proj", p + ".mlp.c_proj", c.intermediate_size, C, true, l, true);
      L.attn_site = add_site({p + ".attn", SiteKind::sublayer, C, C, l});
      L.kv_site = add_site({p + ".attn.kv", SiteKind::attention_kv, C, C, l});
      L.mlp_site = add_site({p + ".mlp", SiteKind::sublayer, C, C, l});
      L.out = add_site({p, SiteKind::hidden, C, C, l});
      residual_projections_.insert(p + ".attn.c_proj.weight");
      residual_projections_.insert(p + ".mlp.c_proj.weight");
      layers_.push_back(L);
    }
    ln_f_ = add_norm(*body, "ln_f", "transformer.ln_f", NormImpl::Kind::layer_norm, C, c.norm_eps, -1);
    build_head(wte_);
  }

  at::Tensor hidden_states(const ModelInput& input) override {
    const at::Tensor& ids = input.input_ids;  // (B, T)
    const int64_t B = ids.size(0), C = config_.hidden_size, H = config_.n_head;
    const int64_t D = C / H;
    const int64_t past = input.cache ? input.cache->length() : 0;
    ModelInput in = input;
    int64_t n_virtual = 0;
    at::Tensor x = embed_with_virtual_tokens(*embed_site_, ids, wte_(ids), in, n_virtual);  // (B, T, C)
    const int64_t T = x.size(1);
    const int64_t last = kv_prefix_positions() + past + T;
    MDL_CHECK(last <= config_.max_position, "[gpt2] ", last, " positions exceed n_positions ",
              config_.max_position, "; shorten the prompt or max tokens");
    x = x + wpe_(positions(in, B, past, T));
    at::Tensor bias;
    if (in.attention_mask.defined() || T > 1)
      bias = fn::attention_bias(in.attention_mask, B, T, past, true, 0, x.scalar_type(), x.device());
    KVCache* cache = in.cache;
    for (size_t l = 0; l < layers_.size(); ++l) {
      Layer* L = &layers_[l];
      x = run_layer(
          [this, L, l, cache, bias, B, T, C, H, D](const at::Tensor& block_input) {
            at::Tensor a = L->ln_1(block_input);
            at::Tensor qkv = L->c_attn(a);  // (B, T, 3C)
            auto parts = qkv.split(C, -1);
            at::Tensor q = parts[0].view({B, T, H, D}).transpose(1, 2);  // (B, H, T, D)
            at::Tensor k = parts[1].view({B, T, H, D}).transpose(1, 2);
            at::Tensor v = parts[2].view({B, T, H, D}).transpose(1, 2);
            if (cache) std::tie(k, v) = cache->append(static_cast<int>(l), k, v);
            at::Tensor layer_bias = bias;
            apply_kv_site(*L->kv_site, k, v, layer_bias);
            at::Tensor o = fn::attention(q, k, v, layer_bias).transpose(1, 2).reshape({B, T, C});
            at::Tensor h = block_input + L->attn_site->apply(a, L->attn_proj(o));
            at::Tensor m = L->ln_2(h);
            h = h + L->mlp_site->apply(m, L->mlp_proj(fn::activation(L->c_fc(m), config_.activation)));
            return L->out->apply(block_input, h);
          },
          x, cache != nullptr);
    }
    x = ln_f_(x);
    return n_virtual > 0 ? x.narrow(1, n_virtual, T - n_virtual) : x;
  }

 private:
  struct Layer {
    Norm ln_1{nullptr}, ln_2{nullptr};
    SiteLinear c_attn{nullptr}, attn_proj{nullptr}, c_fc{nullptr}, mlp_proj{nullptr};
    std::shared_ptr<Site> attn_site, kv_site, mlp_site, out;
  };
  Embedding wte_{nullptr}, wpe_{nullptr};
  Norm ln_f_{nullptr};
  std::shared_ptr<Site> embed_site_;
  std::vector<Layer> layers_;
};

}  // namespace

Model create_gpt2(const ModelConfig& config) {
  return std::make_shared<Gpt2Impl>(config);
}

ArchTargets gpt2_targets() {
  // c_attn is the fused q/k/v projection (Conv1D); mlp.c_proj the MLP's output.
  return {{"c_attn"}, {"c_attn", "mlp.c_proj"}, {}};
}

}  // namespace mdl
