// BERT (BertModel, BertForSequenceClassification, BertForTokenClassification): word + position +
// token-type embeddings, post-LayerNorm encoder blocks, padding masks, a tanh pooler on the first token.
#include "mdl/backbones/bert.h"

#include <ATen/ATen.h>

#include "mdl/core/error.h"
#include "mdl/ops/functional.h"

namespace mdl {
namespace {

class BertImpl : public ModelImpl {
 public:
  explicit BertImpl(const ModelConfig& c) : ModelImpl(c) {
    const int64_t C = c.hidden_size, I = c.intermediate_size;
    auto body = add_container(*this, "bert");
    auto emb = add_container(*body, "embeddings");
    word_ = emb->register_module("word_embeddings", Embedding(c.vocab_size, C));
    position_ = emb->register_module("position_embeddings", Embedding(c.max_position, C));
    token_type_ = emb->register_module("token_type_embeddings", Embedding(c.type_vocab_size, C));
    emb_norm_ = add_norm(*emb, "LayerNorm", "bert.embeddings.LayerNorm", NormImpl::Kind::layer_norm, C,
                         c.norm_eps, -1);
    embed_site_ = add_site({"bert.embeddings.word_embeddings", SiteKind::embedding, C, C, -1});
    auto encoder = add_container(*body, "encoder");
    auto layer = add_container(*encoder, "layer");
    for (int l = 0; l < c.n_layer; ++l) {
      const std::string p = "bert.encoder.layer." + std::to_string(l);
      auto block = add_container(*layer, std::to_string(l));
      Layer L;
      auto attention = add_container(*block, "attention");
      auto self = add_container(*attention, "self");
      L.query = add_linear(*self, "query", p + ".attention.self.query", C, C, true, l);
      L.key = add_linear(*self, "key", p + ".attention.self.key", C, C, true, l);
      L.value = add_linear(*self, "value", p + ".attention.self.value", C, C, true, l);
      auto attn_out = add_container(*attention, "output");
      L.attn_dense = add_linear(*attn_out, "dense", p + ".attention.output.dense", C, C, true, l);
      L.attn_norm = add_norm(*attn_out, "LayerNorm", p + ".attention.output.LayerNorm",
                             NormImpl::Kind::layer_norm, C, c.norm_eps, l);
      auto inter = add_container(*block, "intermediate");
      L.inter = add_linear(*inter, "dense", p + ".intermediate.dense", C, I, true, l);
      auto out = add_container(*block, "output");
      L.out_dense = add_linear(*out, "dense", p + ".output.dense", I, C, true, l);
      L.out_norm =
          add_norm(*out, "LayerNorm", p + ".output.LayerNorm", NormImpl::Kind::layer_norm, C, c.norm_eps, l);
      L.attn_site = add_site({p + ".attention", SiteKind::sublayer, C, C, l});
      L.kv_site = add_site({p + ".attention.kv", SiteKind::attention_kv, C, C, l});
      L.mlp_site = add_site({p + ".output", SiteKind::sublayer, C, C, l});
      L.out = add_site({p, SiteKind::hidden, C, C, l});
      layers_.push_back(L);
    }
    build_head(word_);
  }

  at::Tensor hidden_states(const ModelInput& input) override {
    const at::Tensor& ids = input.input_ids;  // (B, T)
    MDL_CHECK(input.cache == nullptr, "[bert] an encoder has no KV cache; pass the whole sequence");
    const int64_t B = ids.size(0), C = config_.hidden_size, H = config_.n_head;
    const int64_t D = C / H;
    auto long_opts = ids.options().dtype(at::kLong);
    ModelInput in = input;
    int64_t n_virtual = 0;
    at::Tensor x = embed_with_virtual_tokens(*embed_site_, ids, word_(ids), in, n_virtual);  // (B, T, C)
    const int64_t T = x.size(1);
    MDL_CHECK(kv_prefix_positions() + T <= config_.max_position, "[bert] ", kv_prefix_positions() + T,
              " positions exceed max_position_embeddings ", config_.max_position);
    at::Tensor pos = positions(in, B, 0, T);
    at::Tensor types =
        in.token_type_ids.defined() ? in.token_type_ids : at::zeros({B, ids.size(1)}, long_opts);
    if (n_virtual > 0) types = at::cat({at::zeros({B, n_virtual}, long_opts), types}, 1);
    x = emb_norm_(x + position_(pos) + token_type_(types));
    at::Tensor bias;
    if (in.attention_mask.defined())
      bias = fn::attention_bias(in.attention_mask, B, T, 0, false, 0, x.scalar_type(), x.device());
    for (auto& layer : layers_) {
      Layer* L = &layer;
      x = run_layer(
          [this, L, bias, B, T, C, H, D](const at::Tensor& block_input) {
            at::Tensor q = L->query(block_input).view({B, T, H, D}).transpose(1, 2);  // (B, H, T, D)
            at::Tensor k = L->key(block_input).view({B, T, H, D}).transpose(1, 2);
            at::Tensor v = L->value(block_input).view({B, T, H, D}).transpose(1, 2);
            at::Tensor layer_bias = bias;
            apply_kv_site(*L->kv_site, k, v, layer_bias);
            at::Tensor ctx = fn::attention(q, k, v, layer_bias).transpose(1, 2).reshape({B, T, C});
            at::Tensor h = L->attn_norm(block_input + L->attn_site->apply(block_input, L->attn_dense(ctx)));
            h = L->out_norm(
                h + L->mlp_site->apply(h, L->out_dense(fn::activation(L->inter(h), config_.activation))));
            return L->out->apply(block_input, h);
          },
          x, false);
    }
    return n_virtual > 0 ? x.narrow(1, n_virtual, T - n_virtual) : x;
  }

 private:
  struct Layer {
    SiteLinear query{nullptr}, key{nullptr}, value{nullptr}, attn_dense{nullptr}, inter{nullptr},
        out_dense{nullptr};
    Norm attn_norm{nullptr}, out_norm{nullptr};
    std::shared_ptr<Site> attn_site, kv_site, mlp_site, out;
  };
  Embedding word_{nullptr}, position_{nullptr}, token_type_{nullptr};
  Norm emb_norm_{nullptr};
  std::shared_ptr<Site> embed_site_;
  std::vector<Layer> layers_;
};

}  // namespace

Model create_bert(const ModelConfig& config) {
  return std::make_shared<BertImpl>(config);
}

ArchTargets bert_targets() {
  // output.dense is the MLP's output; the attention's own output.dense is left alone.
  return {{"query", "value"}, {"key", "value", "output.dense"}, {"attention.output.dense"}};
}

}  // namespace mdl
