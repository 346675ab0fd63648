// Mixture-of-experts backbones: a Mixtral checkpoint from init-model round-trips; sparse upcycling with
// identical experts equals the dense model under every router whose weights sum to one; MoEfication with
// k = E equals the dense model and its report measures what top-k keeps; routing statistics are logged.
#include "mdl/backbones/moe_convert.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <nlohmann/json.hpp>

#include "backbones/fixtures.h"
#include "mdl/io/safetensors.h"
#include "mdl/routing/router.h"
#include "mdl/routing/routing_log.h"

namespace mdl {
namespace {

at::Tensor logits(ModelImpl& m, const at::Tensor& ids, RoutingLog* log = nullptr) {
  ModelInput in;
  in.input_ids = ids;
  in.routing_log = log;
  return m.forward(in);
}

at::Tensor sample_ids(int64_t vocab) {
  return at::arange(0, 48, at::kLong).view({3, 16}) * 7 % (vocab - 3) + 3;
}

TEST(Mixtral, CheckpointLayoutAndRoutingLog) {
  const std::string dir = test::tiny_checkpoint("mixtral");
  Model m = load_model(dir);
  const ModelConfig& c = m->config();
  EXPECT_EQ(c.architecture, "MixtralForCausalLM");
  EXPECT_EQ(c.num_experts, 8);
  EXPECT_EQ(c.experts_per_token, 2);
  auto tensors = io::load_safetensors(dir + "/model.safetensors");
  EXPECT_TRUE(tensors.count("model.layers.0.block_sparse_moe.gate.weight"));
  EXPECT_EQ(tensors.at("model.layers.1.block_sparse_moe.experts.7.w2.weight").sizes(),
            (at::IntArrayRef{c.hidden_size, c.intermediate_size}));
  EXPECT_FALSE(tensors.count("model.layers.0.mlp.gate_proj.weight"));
  torch::NoGradGuard g;
  RoutingLog log;
  logits(*m, sample_ids(c.vocab_size), &log);
  ASSERT_EQ(log.stats().size(), 2u);
  EXPECT_EQ(log.stats()[0].site, "model.layers.0.block_sparse_moe");
  EXPECT_EQ(log.stats()[0].rows, 48);
  EXPECT_NEAR(log.aux_loss().item<double>(),
              c.router_aux_loss_coef * (log.stats()[0].load_balancing + log.stats()[1].load_balancing), 1e-5);
  // Expert choice is refused for this causal decoder, with the reason.
  RouterOptions ec;
  ec.kind = "expert_choice";
  m->set_router(ec);
  EXPECT_THROW_WITH(logits(*m, sample_ids(c.vocab_size)), "expert-choice", "causal decoder");
  Model dense = load_model(test::tiny_checkpoint("llama"));
  EXPECT_THROW_WITH(dense->set_router(ec), "is dense", "mdl upcycle");
}

TEST(Upcycle, IdenticalExpertsEqualTheDenseModelForAnyNormalisedRouter) {
  Model dense = load_model(test::tiny_checkpoint("llama"));
  UpcycleOptions o;
  o.experts = 4;
  o.top_k = 2;
  Model moe = upcycle(*dense, o);
  EXPECT_EQ(moe->config().model_type, "mixtral");
  torch::NoGradGuard g;
  at::Tensor ids = sample_ids(dense->config().vocab_size);
  at::Tensor want = logits(*dense, ids);
  std::vector<nlohmann::json> routers = {
      {{"kind", "top_k"}, {"k", 2}}, {{"kind", "top_k"}, {"k", 1}, {"normalize", true}},
      {{"kind", "softmax"}},         {{"kind", "hash"}},
      {{"kind", "gumbel"}},          {{"kind", "top_k"}, {"k", 3}, {"level", "example"}},
  };
  for (const auto& r : routers) {
    moe->set_router(r.get<RouterOptions>());
    EXPECT_TRUE(at::allclose(logits(*moe, ids), want, 1e-4, 1e-4)) << r.dump();
  }
  // Switch scales by the gate probability (< 1) and drops overflow: not the dense model, as expected.
  moe->set_router(nlohmann::json({{"kind", "switch"}}).get<RouterOptions>());
  EXPECT_FALSE(at::allclose(logits(*moe, ids), want, 1e-4, 1e-4));
  // Saved and reloaded, it is a Mixtral checkpoint with the same logits.
  moe->set_router(nlohmann::json({{"kind", "top_k"}, {"k", 2}}).get<RouterOptions>());
  test::TempDir tmp;
  save_model(*moe, tmp.path());
  Model back = load_model(tmp.path());
  EXPECT_TRUE(at::allclose(logits(*back, ids), want, 1e-4, 1e-4));
  EXPECT_THROW_WITH(upcycle(*load_model(test::tiny_checkpoint("gpt2")), o),
                    "[upcycle] needs a dense Llama-family model");
}

TEST(Moefy, AllGroupsEqualDenseAndTopKKeepsMost) {
  Model dense = load_model(test::tiny_checkpoint("llama"));
  torch::NoGradGuard g;
  at::Tensor ids = sample_ids(dense->config().vocab_size);
  at::Tensor want = logits(*dense, ids);
  for (const std::string method : {"weights", "activations"}) {
    MoefyOptions o;
    o.experts = 4;
    o.top_k = 4;
    o.method = method;
    MoefyReport report;
    Model all = moefy(*dense, o, ids, &report);
    EXPECT_EQ(all->config().intermediate_size, dense->config().intermediate_size / 4);
    EXPECT_TRUE(at::allclose(logits(*all, ids), want, 1e-4, 1e-4)) << method;
    for (double k : report.kept) EXPECT_NEAR(k, 1.0, 1e-5);
    o.top_k = 2;
    Model half = moefy(*dense, o, ids, &report);
    ASSERT_EQ(report.kept.size(), 2u);
    for (double k : report.kept) EXPECT_TRUE(k > 0.0 && k < 1.0) << k;
    std::printf("[moefy %s] top-2 of 4 keeps %.3f of the dense MLP output\n", method.c_str(),
                report.mean_kept());
    // Saved with its unit-weight router and reloaded: same logits.
    test::TempDir tmp;
    save_model(*half, tmp.path());
    EXPECT_TRUE(at::allclose(logits(*load_model(tmp.path()), ids), logits(*half, ids), 1e-5, 1e-5));
  }
  MoefyOptions bad;
  bad.experts = 3;
  EXPECT_THROW_WITH(moefy(*dense, bad, ids, nullptr), "3 experts must divide the MLP width");
}

}  // namespace
}  // namespace mdl
