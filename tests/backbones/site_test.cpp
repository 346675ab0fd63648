// Sites: every projection, block output and embedding is a named place where a function can attach.
#include <ATen/ATen.h>
#include <torch/utils.h>

#include "backbones/fixtures.h"
#include "mdl/backbones/model.h"

namespace mdl {
namespace {

class AddConstant : public SiteFunction {
 public:
  explicit AddConstant(double c) : c_(c) {}
  at::Tensor forward(const at::Tensor& input, const at::Tensor& base) override {
    ++calls;
    return base + c_;
  }
  int calls = 0;

 private:
  double c_;
};

TEST(Sites, NamedAsHuggingFaceModulePaths) {
  Model m = load_model(test::tiny_checkpoint("llama"));
  const ModelConfig& c = m->config();
  // 7 projections, 2 sublayers, 2 norms, keys/values and the block output per layer; embeddings, final
  // norm, LM head.
  EXPECT_EQ(m->sites().size(), static_cast<size_t>(c.n_layer * 13 + 3));
  EXPECT_EQ(m->site("model.layers.1.post_attention_layernorm").info().kind, SiteKind::norm);
  EXPECT_EQ(m->site("model.norm").info().kind, SiteKind::norm);
  const SiteInfo& q = m->site("model.layers.1.self_attn.q_proj").info();
  EXPECT_EQ(q.kind, SiteKind::linear);
  EXPECT_EQ(q.in_features, c.hidden_size);
  EXPECT_EQ(q.out_features, c.n_head * c.head_dim);
  EXPECT_EQ(q.layer, 1);
  EXPECT_EQ(m->site("model.layers.0.self_attn.k_proj").info().out_features, c.n_kv_head * c.head_dim);
  EXPECT_EQ(m->site("model.layers.0").info().kind, SiteKind::hidden);
  EXPECT_EQ(m->site("model.embed_tokens").info().kind, SiteKind::embedding);
  EXPECT_THROW_WITH(m->site("model.layers.0.attn.q"), "no site 'model.layers.0.attn.q'",
                    "sites are named like");
  Model g = load_model(test::tiny_checkpoint("gpt2"));
  EXPECT_EQ(g->site("transformer.h.0.attn.c_attn").info().out_features, 3 * g->config().hidden_size);
  Model b = load_model(test::tiny_checkpoint("bert"));
  EXPECT_EQ(b->site("bert.encoder.layer.1.attention.self.query").info().layer, 1);
}

TEST(Sites, AttachedFunctionsChangeTheOutputAndDetachingRestoresIt) {
  Model m = load_model(test::tiny_checkpoint("llama"));
  torch::NoGradGuard g;
  ModelInput in;
  in.input_ids = at::arange(4, 12, at::kLong).view({1, -1});
  at::Tensor base = m->forward(in);
  for (const std::string name :
       {"model.layers.0.mlp.down_proj", "model.layers.1", "model.embed_tokens", "lm_head"}) {
    auto f = std::make_shared<AddConstant>(0.5);
    m->site(name).attach(f);
    EXPECT_FALSE(m->site(name).empty());
    at::Tensor changed = m->forward(in);
    EXPECT_EQ(f->calls, 1) << name;
    EXPECT_GT((changed - base).abs().max().item<double>(), 1e-4) << name;
    m->site(name).attach(nullptr);
    EXPECT_TRUE(at::equal(m->forward(in), base)) << name;
  }
}

}  // namespace
}  // namespace mdl
