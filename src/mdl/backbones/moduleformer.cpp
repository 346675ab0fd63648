#include "mdl/backbones/moduleformer.h"

#include <ATen/ATen.h>

#include <nlohmann/json.hpp>

#include "mdl/backbones/expert_router.h"
#include "mdl/backbones/mixture_of_attention.h"
#include "mdl/core/error.h"
#include "mdl/ops/functional.h"
#include "mdl/routing/gates.h"

namespace mdl {

RouterOptions moduleformer_config_router(const ModelConfig& c, int64_t k) {
  if (!c.router_json.empty()) {
    RouterOptions o = nlohmann::json::parse(c.router_json).get<RouterOptions>();
    if (o.kind == "top_k") o.k = std::min(o.k, k);  // one override for both mixtures: at most their k
    return o;
  }
  RouterOptions o = moduleformer_router(k, c.sample_topk);
  if (c.aux_loss_type == "mi") {
    o.mi_loss_coef = c.router_aux_loss_coef;
  } else {  // IBM's switch loss normalises the routed counts over N k assignments, mdl's over N rows
    o.load_balancing_coef = c.router_aux_loss_coef / static_cast<double>(k);
    o.z_loss_coef = 0.1 * c.router_aux_loss_coef;
  }
  return o;
}

namespace {

std::shared_ptr<torch::nn::Module> container(torch::nn::Module& parent, const std::string& name) {
  return parent.register_module(name, std::make_shared<torch::nn::Module>(name));
}

class ModuleFormerImpl : public ModelImpl {
 public:
  explicit ModuleFormerImpl(const ModelConfig& c) : ModelImpl(c) {
    const int64_t C = c.hidden_size, A = c.att_hidden, F = c.intermediate_size, E = c.num_experts;
    MDL_CHECK(A > 0 && c.num_att_experts > 0 && E > 0, "[moduleformer] the config needs att_hidden, ",
              "n_att_experts and n_mlp_experts > 0, got ", A, ", ", c.num_att_experts, ", ", E);
    auto body = add_container(*this, "transformer");
    wte_ = body->register_module("wte", Embedding(c.vocab_size, C));
    embed_site_ = add_site({"transformer.wte", SiteKind::embedding, C, C, -1});
    auto blocks = add_container(*body, "h");
    GateOptions gate;
    gate.kind = c.gate_type;
    gate.hidden = c.gating_size;
    for (int l = 0; l < c.n_layer; ++l) {
      const std::string p = "transformer.h." + std::to_string(l);
      auto block = add_container(*blocks, std::to_string(l));
      Layer L;
      L.ln_1 = add_norm(*block, "ln_1", p + ".ln_1", NormImpl::Kind::layer_norm, C, c.norm_eps, l);
      auto attn = add_container(*block, "attn");
      MoaOptions moa;
      moa.experts = c.num_att_experts;
      moa.heads = c.n_head;
      moa.att_hidden = A;
      moa.gate = gate;
      moa.router = moduleformer_config_router(c, c.att_experts_per_token);
      L.moa = attn->register_module("q_proj", MixtureOfAttention(p + ".attn", C, moa, 2 * l, at::kFloat));
      L.k = add_linear(*attn, "k_proj", p + ".attn.k_proj", C, A, true, l);
      L.v = add_linear(*attn, "v_proj", p + ".attn.v_proj", C, A, true, l);
      L.ln_2 = add_norm(*block, "ln_2", p + ".ln_2", NormImpl::Kind::layer_norm, C, c.norm_eps, l);
      auto mlpf = add_container(*block, "mlpf");
      L.w1 = container(*mlpf, "experts")->register_parameter("weight", at::zeros({E, C, F}));
      L.w2 = container(*mlpf, "output_experts")->register_parameter("weight", at::zeros({E, F, C}));
      L.mlp_gate = mlpf->register_module("gate", Gate(gate, C, E, 2 * l + 1, at::kFloat));
      L.attn_site = add_site({p + ".attn", SiteKind::sublayer, C, C, l});
      L.kv_site = add_site({p + ".attn.kv", SiteKind::attention_kv, C, A, l});
      L.mlp_site = add_site({p + ".mlpf", SiteKind::sublayer, C, C, l});
      L.out = add_site({p, SiteKind::hidden, C, C, l});
      L.moe = std::make_shared<ExpertMlp>(
          c, moduleformer_config_router(c, c.experts_per_token), L.mlp_site->name(), "transformer.mlpf",
          [g = L.mlp_gate](const at::Tensor& rows) { return g->scores(rows); }, E,
          // set_data keeps these handles the parameters' own through load and `to`
          [w1 = L.w1, w2 = L.w2, act = c.activation](int64_t e, const at::Tensor& rows) {
            return at::matmul(fn::activation(at::matmul(rows, w1[e]), act), w2[e]);
          });
      layers_.push_back(L);
    }
    ln_f_ = add_norm(*body, "ln_f", "transformer.ln_f", NormImpl::Kind::layer_norm, C, c.norm_eps, -1);
    build_head(wte_);
  }

  void set_router(const RouterOptions& options) override {
    for (auto& L : layers_) L.moa->set_router(options), L.moe->set_router(options);
  }
  const Router* router() const override { return layers_.empty() ? nullptr : &layers_[0].moe->policy(); }

  at::Tensor hidden_states(const ModelInput& input) override {
    const at::Tensor& ids = input.input_ids;  // (B, T)
    const int64_t B = ids.size(0), H = config_.n_head, D = config_.head_dim;
    ModelInput in = input;
    int64_t n_virtual = 0;
    at::Tensor x = embed_with_virtual_tokens(*embed_site_, ids, wte_(ids), in, n_virtual);  // (B, T, C)
    const int64_t T = x.size(1);
    const at::Tensor key_mask = in.attention_mask;  // (B, S): cached + T, or undefined
    KVCache* cache = in.cache;
    for (size_t l = 0; l < layers_.size(); ++l) {
      Layer* L = &layers_[l];
      x = run_layer(
          [this, L, l, cache, key_mask, B, T, H, D](const at::Tensor& block_input) {
            at::Tensor a = L->ln_1(block_input);
            at::Tensor k = L->k(a).view({B, T, H, D}).transpose(1, 2);  // (B, H, T, D)
            at::Tensor v = L->v(a).view({B, T, H, D}).transpose(1, 2);
            if (cache) std::tie(k, v) = cache->append(static_cast<int>(l), k, v);  // (B, H, S, D)
            at::Tensor unused_bias, mask = key_mask;
            const int64_t prefix = apply_kv_site(*L->kv_site, k, v, unused_bias);
            if (prefix > 0 && mask.defined())  // prefix positions are real keys for every query
              mask = at::cat({at::ones({B, prefix}, mask.options()), mask}, 1);
            if (mask.defined())
              MDL_CHECK(mask.size(1) == k.size(2), "[moduleformer] attention_mask covers ", mask.size(1),
                        " positions, the keys are ", k.size(2), " (cached + new)");
            at::Tensor h = block_input + L->attn_site->apply(a, L->moa->forward(a, k, v, mask));
            at::Tensor m = L->ln_2(h);
            h = h + L->mlp_site->apply(m, L->moe->forward(m, is_training()));
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
    MixtureOfAttention moa{nullptr};
    SiteLinear k{nullptr}, v{nullptr};
    at::Tensor w1, w2;  // (E, C, F), (E, F, C)
    Gate mlp_gate{nullptr};
    std::shared_ptr<ExpertMlp> moe;
    std::shared_ptr<Site> attn_site, kv_site, mlp_site, out;
  };
  Embedding wte_{nullptr};
  Norm ln_f_{nullptr};
  std::shared_ptr<Site> embed_site_;
  std::vector<Layer> layers_;
};

}  // namespace

Model create_moduleformer(const ModelConfig& config) {
  return std::make_shared<ModuleFormerImpl>(config);
}

ArchTargets moduleformer_targets() {
  return {{"k_proj", "v_proj"}, {"k_proj", "v_proj"}, {}};
}

}  // namespace mdl
