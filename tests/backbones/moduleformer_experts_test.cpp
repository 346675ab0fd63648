// Experts added to and pruned from a ModuleFormer: adding keeps every old weight and router row and records
// the old counts; keeping the original experts of a grown model gives back the original model exactly;
// pruning keeps the chosen rows of experts and routers, per layer; usage is measured from the routing
// log; and a run with freeze_old_experts moves only the new experts and their router rows.
#include "mdl/backbones/moduleformer_experts.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/utils.h>

#include <nlohmann/json.hpp>
#include <numeric>

#include "mdl/backbones/init_model.h"
#include "mdl/modules/module_set.h"
#include "mdl/routing/routing_log.h"
#include "mdl/training/trainer.h"
#include "test_util.h"

namespace mdl {
namespace {

Model tiny(const test::TempDir& root, const std::string& gate = "mlp") {
  InitModelOptions o;
  o.arch = "moduleformer";
  o.seed = 4;
  init_model(o, root / "m");
  ModelConfig c = load_model_config(root / "m");
  Model m = create_model([&] {
    nlohmann::json j = nlohmann::json::parse(model_config_to_json(c));
    j["gate_type"] = gate;
    return parse_model_config(j.dump());
  }());
  m->init_weights(9);
  m->eval();
  return m;
}

at::Tensor logits(Model& m, const at::Tensor& ids, RoutingLog* log = nullptr) {
  torch::NoGradGuard g;
  ModelInput in;
  in.input_ids = ids;
  in.routing_log = log;
  return m->forward(in);
}

std::map<std::string, at::Tensor> params(const Model& m) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : m->named_parameters()) out[p.key()] = p.value().detach().clone();
  return out;
}

TEST(ModuleFormerExperts, AddedExpertsKeepTheOldAndKeepingTheOldGivesTheModelBack) {
  test::TempDir root;
  for (const std::string gate : {"mlp", "linear", "gmm"}) {
    Model m = tiny(root, gate);
    const ModelConfig& c = m->config();
    Model grown = add_experts(*m, {3, 2}, 1);
    EXPECT_EQ(grown->config().num_att_experts, c.num_att_experts + 3) << gate;
    EXPECT_EQ(grown->config().num_experts, c.num_experts + 2) << gate;
    const ExpertCounts frozen = frozen_experts(grown->config());
    EXPECT_EQ(frozen.attention, c.num_att_experts);
    EXPECT_EQ(frozen.mlp, c.num_experts);
    // Old rows unchanged, new ones drawn; the rest identical.
    const auto before = params(m), after = params(grown);
    for (const auto& [name, t] : before) {
      const at::Tensor& g = after.at(name);
      if (g.sizes() == t.sizes()) {
        EXPECT_TRUE(at::equal(g, t)) << gate << " " << name;
      } else {
        EXPECT_TRUE(at::equal(g.narrow(0, 0, t.size(0)), t)) << gate << " " << name;
        EXPECT_GT(g.narrow(0, t.size(0), g.size(0) - t.size(0)).abs().sum().item<double>(), 0.0) << name;
      }
    }
    // Keeping the original experts: the original model, output for output.
    std::vector<int64_t> att(static_cast<size_t>(c.num_att_experts)), mlp(static_cast<size_t>(c.num_experts));
    std::iota(att.begin(), att.end(), 0), std::iota(mlp.begin(), mlp.end(), 0);
    Model back = keep_experts(*grown, std::vector<std::vector<int64_t>>(c.n_layer, att),
                              std::vector<std::vector<int64_t>>(c.n_layer, mlp));
    EXPECT_EQ(back->num_parameters(), m->num_parameters());
    const at::Tensor ids = at::arange(3, 15, at::kLong).view({1, -1});
    EXPECT_CLOSE(logits(back, ids), logits(m, ids), 1e-6) << gate;
    EXPECT_EQ(frozen_experts(back->config()).mlp, 0);  // the indices changed: nothing recorded as frozen
  }
  EXPECT_THROW_WITH(add_experts(*tiny(root), {0, 0}, 1), "[experts add] give a number");
}

TEST(ModuleFormerExperts, PruningKeepsEachLayersChosenRowsAndUsageComesFromTheLog) {
  test::TempDir root;
  Model m = tiny(root);
  const ModelConfig& c = m->config();
  RoutingLog log;
  logits(m, at::arange(3, 40, at::kLong).view({1, -1}), &log);
  ExpertUsageMeter meter(c);
  meter.add(log);
  const ExpertUsage usage = meter.usage();
  ASSERT_EQ(usage.mlp.size(), static_cast<size_t>(c.n_layer));
  for (const auto& layer : usage.mlp)
    EXPECT_NEAR(std::accumulate(layer.begin(), layer.end(), 0.0), 1.0, 1e-9);
  EXPECT_EQ(most_used({{0.1, 0.5, 0.2, 0.2}}, 2),
            (std::vector<std::vector<int64_t>>{{1, 2}}));                 // ties: lower
  const std::vector<std::vector<int64_t>> keep = {{6, 1, 3}, {0, 2, 7}};  // each layer its own, any order
  Model pruned = keep_experts(*m, {}, keep);
  EXPECT_EQ(pruned->config().num_experts, 3);
  EXPECT_EQ(pruned->config().num_att_experts, c.num_att_experts);
  EXPECT_LT(pruned->num_parameters(), m->num_parameters());
  const auto before = params(m), after = params(pruned);
  for (int l = 0; l < 2; ++l) {
    const std::string p = "transformer.h." + std::to_string(l) + ".mlpf.";
    const at::Tensor rows = at::tensor(keep[l], at::kLong);
    for (const char* n : {"experts.weight", "output_experts.weight", "gate.w_gate.3.weight"})
      EXPECT_TRUE(at::equal(after.at(p + n), before.at(p + n).index_select(0, rows))) << p << n;
    EXPECT_TRUE(at::equal(after.at(p + "gate.w_gate.0.weight"), before.at(p + "gate.w_gate.0.weight")));
  }
  // k shrinks with the experts; bad lists are refused naming what is wrong.
  Model one = keep_experts(*m, {}, {{2}, {5}});
  EXPECT_EQ(one->config().experts_per_token, 1);
  EXPECT_TRUE(at::isfinite(logits(one, at::arange(3, 9, at::kLong).view({1, -1}))).all().item<bool>());
  EXPECT_THROW_WITH(keep_experts(*m, {}, {{0, 1}, {2}}), "every layer keeps the same number");
  EXPECT_THROW_WITH(keep_experts(*m, {}, {{0, 99}, {1, 2}}), "layer 0 keeps expert 99 of 8");
  EXPECT_THROW_WITH(most_used(usage.mlp, 9), "--keep 9 must be in 1..8");
}

TEST(ModuleFormerExperts, FreezeOldExpertsTrainsOnlyTheNewRows) {
  test::TempDir root;
  Model grown = add_experts(*tiny(root), {2, 2}, 3);
  const auto before = params(grown);
  Dataset data;
  for (int i = 0; i < 8; ++i) {
    Example e;
    for (int t = 0; t < 12; ++t) e.ids.push_back(3 + (i * 7 + t * 5) % 50);
    e.targets = e.ids;
    data.examples.push_back(e);
  }
  ModuleSet set(grown);
  TrainOptions o;
  o.steps = 3;
  o.batch_size = 4;
  o.train_base = true;
  o.freeze_old_experts = true;
  o.weight_decay = 0.1;  // would move frozen rows if they were merely without a gradient
  o.schedule.lr = 1e-2;
  o.schedule.total_steps = 3;
  {
    Trainer trainer(set, {}, o);
    trainer.train(data, nullptr);
  }
  const ModelConfig& c = grown->config();
  const ExpertCounts old = frozen_experts(c);
  int moved = 0;
  for (const auto& [name, t] : params(grown)) {
    const at::Tensor& was = before.at(name);
    const bool rows = name.find(".experts.weight") != std::string::npos ||
                      name.find("output_experts.weight") != std::string::npos ||
                      name.find("w_gate.3.weight") != std::string::npos;
    if (!rows) {
      EXPECT_TRUE(at::equal(t, was)) << name << " moved";
      continue;
    }
    const int64_t n = name.find(".attn.") != std::string::npos ? old.attention : old.mlp;
    EXPECT_TRUE(at::equal(t.narrow(0, 0, n), was.narrow(0, 0, n))) << name << ": an old expert moved";
    moved += !at::equal(t.narrow(0, n, t.size(0) - n), was.narrow(0, n, t.size(0) - n));
  }
  EXPECT_EQ(moved, 6 * c.n_layer);  // the new rows of both mixtures' experts, outputs and gates
  // Refusals: without train_base, and on a model without added experts.
  o.train_base = false;
  EXPECT_THROW_WITH(Trainer(set, {}, o), "freeze_old_experts trains the new experts of the backbone");
  o.train_base = true;
  ModuleSet plain(tiny(root));
  EXPECT_THROW_WITH(Trainer(plain, {}, o), "the model has no added experts", "mdl experts add");
}

}  // namespace
}  // namespace mdl
