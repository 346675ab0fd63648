// Fusion (AdapterFusion attention and a learned gate per module): the site output equals the formula on
// the members' changes, attention weights sum to one, every fusion parameter gets a gradient, members
// are skipped only where the fusion covers them, save/load is exact, and misuse is refused.
#include <ATen/ATen.h>
#include <torch/utils.h>

#include <nlohmann/json.hpp>

#include "backbones/fixtures.h"
#include "mdl/aggregation/parallel.h"
#include "mdl/modules/module_set.h"

namespace mdl {
namespace {

at::Tensor logits(ModelImpl& m) {
  ModelInput in;
  in.input_ids = at::arange(3, 15, at::kLong).view({2, 6});
  return m.forward(in);
}

// Two adapters with non-zero weights, and a LoRA on other sites.
ModuleSet with_members() {
  ModuleSet set(load_model(test::tiny_checkpoint("llama")));
  ModuleConfig adapter;
  adapter.type = "adapter";
  set.add("c", adapter);
  adapter.seed = 3;
  set.add("d", adapter);
  torch::NoGradGuard g;
  at::manual_seed(1);
  for (const char* n : {"c", "d"})
    for (auto& [k, t] : set.tensors(n)) t.copy_(at::randn_like(t) * 0.3);
  return set;
}

ModuleConfig fusion_of(std::vector<std::string> members, const std::string& kind = "attention") {
  ModuleConfig c;
  c.type = "fusion";
  c.fusion.members = std::move(members);
  c.fusion.kind = kind;
  return c;
}

TEST(Fusion, AttentionEqualsTheFormulaAndWeightsSumToOne) {
  ModuleSet set = with_members();
  set.add("f", fusion_of({"c", "d"}));
  const std::string site = set.sites("f")[0];
  EXPECT_EQ(set.sites("f"), set.sites("c"));
  auto f = std::dynamic_pointer_cast<FusionImpl>(set.module_at("f", site));
  {
    torch::NoGradGuard g;
    for (auto& [k, t] : set.tensors("f")) t.add_(at::randn_like(t) * 0.1);
  }
  torch::NoGradGuard g;
  const int64_t C = f->value.size(0);
  at::Tensor x = at::randn({2, 3, C}), h = at::randn({2, 3, C});
  at::Tensor got = f->forward(x, h);
  at::Tensor oc = set.module_at("c", site)->forward(x, h) - h,
             od = set.module_at("d", site)->forward(x, h) - h;
  at::Tensor q = at::matmul(h, f->query.t());
  at::Tensor sc = (q * at::matmul(oc, f->key.t())).sum(-1), sd = (q * at::matmul(od, f->key.t())).sum(-1);
  at::Tensor ac = 1 / (1 + (sd - sc).exp()), ad = 1 - ac;
  at::Tensor want =
      h + ac.unsqueeze(-1) * at::matmul(oc, f->value.t()) + ad.unsqueeze(-1) * at::matmul(od, f->value.t());
  EXPECT_TRUE(at::allclose(got, want, 1e-5, 1e-5));
  EXPECT_TRUE(at::allclose(f->last_weights().sum(-1), at::ones({2, 3}), 1e-6));
}

TEST(Fusion, GateEqualsTheFormulaAndEveryParameterLearns) {
  for (const std::string kind : {"gate", "attention"}) {
    ModuleSet set = with_members();
    set.add("f", fusion_of({"c", "d"}, kind));
    const std::string site = set.sites("f")[0];
    if (kind == "gate") {  // w = 0, b = 0: each member at half strength
      torch::NoGradGuard g;
      auto f = set.module_at("f", site);
      at::Tensor x = at::randn({1, 2, 64}), h = at::randn({1, 2, 64});
      at::Tensor want = h + 0.5 * (set.module_at("c", site)->forward(x, h) - h) +
                        0.5 * (set.module_at("d", site)->forward(x, h) - h);
      EXPECT_TRUE(at::allclose(f->forward(x, h), want, 1e-5, 1e-5));
    }
    set.freeze_base({"f"});
    set.model()->train();
    logits(*set.model()).pow(2).mean().backward();
    for (const auto& [k, t] : set.tensors("f")) {
      ASSERT_TRUE(t.grad().defined()) << kind << " " << k;
      EXPECT_GT(t.grad().abs().sum().item<double>(), 0.0) << kind << " " << k;
    }
    for (const auto& [k, t] : set.tensors("c"))
      EXPECT_FALSE(t.grad().defined()) << "member " << k << " is frozen";
  }
}

TEST(Fusion, MembersAreSkippedWhereFusedAndSaveLoadIsExact) {
  ModuleSet set = with_members();
  set.model()->eval();
  torch::NoGradGuard g;
  const at::Tensor stacked = logits(*set.model());
  set.add("f", fusion_of({"c", "d"}));
  const at::Tensor fused = logits(*set.model());
  EXPECT_FALSE(at::allclose(fused, stacked, 1e-5, 1e-5));
  set.set_active("f", false);
  EXPECT_TRUE(at::allclose(logits(*set.model()), stacked));  // the members act alone again
  set.set_active("f", true);
  test::TempDir tmp;
  for (const char* n : {"c", "d", "f"}) set.save(n, tmp / n);
  ModuleSet other(load_model(test::tiny_checkpoint("llama")));
  EXPECT_THROW_WITH(other.load(tmp / "f"), "no module named 'c'");
  for (const char* n : {"c", "d", "f"}) other.load(tmp / n);
  other.model()->eval();
  EXPECT_TRUE(at::equal(logits(*other.model()), fused));
}

TEST(Fusion, MisuseIsRefused) {
  ModuleSet set = with_members();
  ModuleConfig prompt;
  prompt.type = "prompt";
  set.add("p", prompt);
  ModuleConfig lora;
  lora.targets.target_modules = {"o_proj"};
  set.add("l", lora);
  EXPECT_THROW_WITH(set.add("f", fusion_of({"c", "p"})), "cannot fuse 'p', a prompt module");
  EXPECT_THROW_WITH(set.add("f", fusion_of({"c", "zz"})), "no module named 'zz'");
  EXPECT_THROW_WITH(set.add("f", fusion_of({"c", "l"})), "share no site");
  EXPECT_THROW_WITH(
      nlohmann::json({{"type", "fusion"}, {"options", {{"members", {"c"}}}}}).get<ModuleConfig>(),
      "fuses at least 2 modules, got 1");
  set.add("f", fusion_of({"c", "d"}));
  EXPECT_THROW_WITH(set.remove("c"), "'c' is fused by 'f'; remove 'f' first");
  set.remove("f");
  set.remove("c");
}

// A mixture of adapter experts behind a learned router equals a per-token brute force, for top-1 and
// dense softmax routing, and its router learns.
TEST(Fusion, MixtureOfAdapterExpertsEqualsPerTokenBruteForce) {
  for (const std::string kind : {"top_k", "softmax"}) {
    ModuleSet set = with_members();
    ModuleConfig c = fusion_of({"c", "d"}, "mixture");
    c.fusion.router.kind = kind;
    c.fusion.router.k = 1;
    c.fusion.router.normalize = false;  // Switch-style: the gate probability weights the expert (and trains)
    set.add("moe", c);
    const std::string site = set.sites("moe")[0];
    auto f = std::dynamic_pointer_cast<FusionImpl>(set.module_at("moe", site));
    {
      torch::NoGradGuard g;
      f->router_w.normal_(0.0, 1.0);
      at::Tensor x = at::randn({2, 3, 64}), h = at::randn({2, 3, 64});
      at::Tensor got = f->forward(x, h);
      for (int64_t b = 0; b < 2; ++b)
        for (int64_t t = 0; t < 3; ++t) {
          at::Tensor xt = x[b][t].view({1, 1, -1}), ht = h[b][t].view({1, 1, -1});
          at::Tensor p = at::softmax(at::mv(f->router_w, x[b][t]), 0);
          at::Tensor want = ht.clone();
          for (int64_t e = 0; e < 2; ++e) {
            const double w = kind == "softmax" || p.argmax().item<int64_t>() == e ? p[e].item<double>() : 0.0;
            want += w * (set.module_at(e == 0 ? "c" : "d", site)->forward(xt, ht) - ht);
          }
          EXPECT_TRUE(at::allclose(got[b][t], want.view({-1}), 1e-5, 1e-5)) << kind << " " << b << "," << t;
        }
    }
    set.freeze_base({"moe"});
    set.model()->train();
    logits(*set.model()).pow(2).mean().backward();
    EXPECT_GT(f->router_w.grad().abs().sum().item<double>(), 0.0) << kind;
  }
}

// Parallel: one pass, one output per branch, each equal to running that branch alone.
TEST(Parallel, OnePassEqualsEachBranchAlone) {
  ModuleSet set = with_members();
  set.model()->eval();
  torch::NoGradGuard g;
  ModelInput in;
  in.input_ids = at::arange(3, 15, at::kLong).view({2, 6});
  auto outs = parallel_forward(*set.model(), in, {{{"c", 1.0}}, {{"d", 0.5}}, {}});
  ASSERT_EQ(outs.size(), 3u);
  set.set_active("d", false);
  EXPECT_TRUE(at::allclose(outs[0], set.model()->forward(in), 1e-5, 1e-5));
  set.set_active("c", false), set.set_active("d", true), set.set_scale("d", 0.5);
  EXPECT_TRUE(at::allclose(outs[1], set.model()->forward(in), 1e-5, 1e-5));
  set.set_active("d", false);
  EXPECT_TRUE(at::allclose(outs[2], set.model()->forward(in), 1e-5, 1e-5));
}

}  // namespace
}  // namespace mdl
