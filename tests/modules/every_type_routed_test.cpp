// Algorithm 1 for every module type that keeps shapes, on GPT-2, Llama, BERT and ModuleFormer: under each
// router a site has for ordinary modules (the active modules with their scales, for every row; each example's
// own ordered, weighted list), with both aggregations (a weighted sum of changes; a stack in the written
// order), one batch equals a plain reference loop: each example alone, through a fresh model holding
// only its modules, loaded in its order with its weights. Additive types commute (the table's `additive`
// means that); prompts and prefixes, which lengthen the sequence, are refused per example with the reason.
// Under the learned routers (every router kind) and the aggregators of a module group (weighted sum,
// AdapterFusion attention, gate, parameter average), two modules of each type as members equal the
// formula written out by hand over each member's own change at every site they cover.
#include <ATen/ATen.h>
#include <torch/utils.h>

#include <nlohmann/json.hpp>

#include "backbones/fixtures.h"
#include "mdl/backbones/model.h"
#include "mdl/core/forward_context.h"
#include "mdl/modules/fusion.h"
#include "mdl/modules/module_set.h"
#include "mdl/modules/module_type.h"
#include "mdl/modules/targets.h"
#include "mdl/routing/router.h"
#include "mdl/routing/routing_context.h"
#include "modules/module_fixtures.h"

namespace mdl {
namespace {

struct Case {
  std::string arch, type;
};
std::ostream& operator<<(std::ostream& os, const Case& c) {
  return os << c.arch << "_" << c.type;
}

constexpr int64_t kTasks = 2;

/// A small module of `type` (task-routed types know kTasks tasks).
ModuleConfig config_for(const std::string& type) {
  ModuleConfig c;
  c.type = type;
  c.lora.r = 4;
  c.hyper.num_tasks = kTasks;
  c.poly.num_tasks = kTasks;
  c.sparse.density = 0.1;
  c.adapter.reduction_factor = 4;
  c.compacter.reduction_factor = 4;
  c.compacter.phm_dim = 2;
  return c;
}

/// Saves modules "x" and "y" of the case's type and adapter "z" under `dir`, with random non-zero weights
/// (a sparse module's selection stays as drawn).
void save_modules(const std::string& model, const std::string& dir, const std::string& type) {
  ModuleSet set(load_model(model));
  for (uint64_t i = 0; i < 2; ++i) {
    const std::string name = i == 0 ? "x" : "y";
    ModuleConfig c = config_for(type);
    c.seed = 3 + i;
    std::map<std::string, at::Tensor> init;
    if (type == "sparse") {
      c.targets.target_modules = {"all-linear"};
      at::manual_seed(static_cast<uint64_t>(20 + i));
      for (const auto& site : match_sites(*set.model(), c.targets, SiteKind::linear))
        init[site->name()] = at::rand_like(set.model()->linear(site->name()).weight);
    }
    set.add(name, c, init);
    torch::NoGradGuard g;
    at::manual_seed(static_cast<uint64_t>(7 + i));
    for (auto& [k, t] : set.tensors(name))
      if (k.find("indices") == std::string::npos && t.is_floating_point()) t.copy_(at::randn_like(t) * 0.3);
    set.save(name, dir + "/" + name);
  }
  test::save_random_adapters(model, dir, {"z"}, 5);
}

at::Tensor ids_batch(int64_t rows) {
  return (at::arange(0, rows * 6, at::kLong).view({rows, 6}) * 7) % 50 + 3;
}

at::Tensor run(ModelImpl& m, const at::Tensor& ids, const RoutingContext& rc) {
  ModelInput in;
  in.input_ids = ids;
  in.routing = &rc;
  return m.forward(in);
}

/// The reference for one example: a fresh model with only its modules, loaded in its order, scaled.
at::Tensor reference(const std::string& model, const std::string& dir, const at::Tensor& ids,
                     const std::vector<ModuleChoice>& modules, int64_t task) {
  ModuleSet set(load_model(model));
  set.model()->eval();
  for (const auto& c : modules) {
    set.load(dir + "/" + c.name);
    set.set_scale(c.name, c.scale);
  }
  RoutingContext rc;
  rc.task_ids = at::tensor({task}, at::kLong);
  return run(*set.model(), ids, rc);
}

class EveryTypeRouted : public testing::TestWithParam<Case> {};

TEST_P(EveryTypeRouted, OneBatchEqualsEachExampleThroughItsModulesInOrder) {
  const Case& tc = GetParam();
  const std::string model = test::tiny_checkpoint(tc.arch);
  test::TempDir dir;
  save_modules(model, dir.path(), tc.type);
  torch::NoGradGuard g;
  ModuleSet set(load_model(model));
  set.model()->eval();
  for (const std::string n : {"z", "y", "x"}) set.load(dir / n);  // loaded in an order no row writes
  const std::vector<int64_t> tasks = {0, 1, 0, 1, 1, 0};
  const at::Tensor task_ids = at::tensor(tasks, at::kLong), ids = ids_batch(6);

  // Router 1: the active modules with their scales, the same for every row (attachment order: y, x).
  set.set_active("z", false);
  set.set_scale("x", 0.7);
  set.set_scale("y", 1.3);
  RoutingContext by_flags;
  by_flags.task_ids = task_ids;
  const at::Tensor flagged = run(*set.model(), ids, by_flags);
  for (int64_t b = 0; b < 6; ++b)
    EXPECT_CLOSE(flagged.narrow(0, b, 1),
                 reference(model, dir.path(), ids.narrow(0, b, 1), {{"y", 1.3}, {"x", 0.7}}, tasks[b]), 2e-5)
        << "active modules, row " << b;

  // Router 2: each example's own ordered, weighted list; sums and stacks, with an adapter either side.
  set.set_active("z", true);
  set.set_scale("x", 1.0);
  set.set_scale("y", 1.0);
  const std::vector<std::vector<ModuleChoice>> lists = {{{"x", 1.0}},
                                                        {{"y", 0.5}, {"x", 1.0}},
                                                        {{"x", 1.0}, {"y", 0.5}},
                                                        {{"x", 1.0}, {"z", 1.0}},
                                                        {{"z", 1.0}, {"y", -0.8}},
                                                        {}};
  RoutingContext per_example;
  per_example.task_ids = task_ids;
  per_example.modules = lists;
  const at::Tensor mixed = run(*set.model(), ids, per_example);
  std::vector<at::Tensor> want;
  for (int64_t b = 0; b < 6; ++b) {
    want.push_back(
        reference(model, dir.path(), ids.narrow(0, b, 1), lists[static_cast<size_t>(b)], tasks[b]));
    EXPECT_CLOSE(mixed.narrow(0, b, 1), want.back(), 2e-5) << "per-example modules, row " << b;
  }
  // Rows 1 and 2 hold the same weighted sum in two orders, on the same ids only in the reference: an
  // additive type's changes commute; a row with modules differs from the base row.
  const at::Tensor row1 = ids.narrow(0, 1, 1);
  const at::Tensor yx = reference(model, dir.path(), row1, {{"y", 0.5}, {"x", 1.0}}, 1);
  const at::Tensor xy = reference(model, dir.path(), row1, {{"x", 1.0}, {"y", 0.5}}, 1);
  if (module_type(tc.type).additive) {
    EXPECT_CLOSE(yx, xy, 2e-5) << tc.type << " is declared additive";
  }
  EXPECT_CHANGED(want[0], reference(model, dir.path(), ids.narrow(0, 0, 1), {}, 0));
}

/// A group over "x" and "y" of the case's type at every site: attention, gate, a mixture under every
/// router kind, and (plain LoRAs only) a parameter average; each equals the formula over the members' own
/// changes, o_n = member_n(x, h) - h, written out here.
TEST_P(EveryTypeRouted, LearnedRoutersAndAggregatorsOverTwoModulesEqualTheFormula) {
  const Case& tc = GetParam();
  const std::string model = test::tiny_checkpoint(tc.arch);
  test::TempDir dir;
  save_modules(model, dir.path(), tc.type);
  torch::NoGradGuard g;
  struct Kind {
    std::string kind, router;
    int64_t k = 1;
    bool normalize = false;
  };
  std::vector<Kind> kinds = {{"attention", ""}, {"gate", ""}};
  for (const std::string r : {"softmax", "top_k", "switch", "expert_choice", "hash", "gumbel"})
    kinds.push_back({"mixture", r});
  kinds.push_back({"mixture", "top_k", 2, true});
  kinds.push_back({"average", "softmax"});
  const at::Tensor ids = ids_batch(2).narrow(1, 0, 3);  // (2, 3): the rows' token ids (hash routing)
  RoutingContext rc;
  rc.task_ids = at::tensor({0, 1}, at::kLong);
  ForwardContext fc;
  fc.routing = &rc;
  fc.input_ids = &ids;
  for (const Kind& k : kinds) {
    ModuleSet set(load_model(model));
    set.model()->eval();
    for (const std::string n : {"x", "y"}) set.load(dir / n);
    ModuleConfig c;
    c.type = "fusion";
    c.fusion.members = {"x", "y"};
    c.fusion.kind = k.kind;
    c.fusion.router.kind = k.router.empty() ? "top_k" : k.router;
    c.fusion.router.k = k.k;
    c.fusion.router.normalize = k.normalize;
    if (k.kind == "average") c.fusion.router.level = "example";
    if (k.kind == "average" && tc.type != "lora") {  // refused: the members have no LoRA factors to average
      const std::string is_a = "is a " + tc.type + " module";
      EXPECT_THROW_WITH(set.add("f", c), "an average mixes its members' LoRA factors", is_a.c_str());
      continue;
    }
    set.add("f", c);
    set.model()->eval();
    at::manual_seed(11);
    for (auto& [name, t] : set.tensors("f")) t.add_(at::randn_like(t) * 0.5);
    const std::string what = k.kind + "/" + k.router + "/" + std::to_string(k.k);
    for (const std::string& site : set.sites("f")) {
      auto f = std::dynamic_pointer_cast<FusionImpl>(set.module_at("f", site));
      ASSERT_TRUE(f != nullptr);
      const int64_t in = f->site().in_features, out = f->site().out_features;
      at::Tensor x = at::randn({2, 3, in}), h = at::randn({2, 3, out});
      ForwardContextGuard guard(fc);
      const at::Tensor got = f->forward(x, h);
      std::vector<at::Tensor> o;  // each member's own change
      for (const std::string n : {"x", "y"}) o.push_back(set.module_at(n, site)->forward(x, h) - h);
      at::Tensor want;
      if (k.kind == "attention") {
        at::Tensor q = at::matmul(h, f->query.t());
        at::Tensor s0 = (q * at::matmul(o[0], f->key.t())).sum(-1),
                   s1 = (q * at::matmul(o[1], f->key.t())).sum(-1);
        at::Tensor a0 = 1 / (1 + (s1 - s0).exp());
        want = h + a0.unsqueeze(-1) * at::matmul(o[0], f->value.t()) +
               (1 - a0).unsqueeze(-1) * at::matmul(o[1], f->value.t());
      } else if (k.kind == "gate") {
        at::Tensor g0 = at::sigmoid(at::matmul(h, f->gate_w[0]) + f->gate_b[0]);
        at::Tensor g1 = at::sigmoid(at::matmul(h, f->gate_w[1]) + f->gate_b[1]);
        want = h + g0.unsqueeze(-1) * o[0] + g1.unsqueeze(-1) * o[1];
      } else if (k.kind == "mixture") {
        // The policy's weights for these logits (the policies' own formulas are routing/router_test's).
        RouterInput ri;
        ri.token_ids = ids.reshape({-1});
        const at::Tensor logits =
            k.router == "hash" ? at::Tensor() : at::matmul(x.reshape({6, in}), f->router_w.t());
        at::Tensor w = make_router(c.fusion.router)->route(logits, 2, ri).dense_weights().view({2, 3, 2});
        want = h + w.select(2, 0).unsqueeze(-1) * o[0] + w.select(2, 1).unsqueeze(-1) * o[1];
      } else {  // average: per example, softmax over the mean token's scores; the LoRAs' factors averaged
        want = h.clone();
        for (int64_t b = 0; b < 2; ++b) {
          at::Tensor p = at::softmax(at::mv(f->router_w, x[b].mean(0)), 0);
          at::Tensor A[2], B[2];
          double s = 0;
          for (int n = 0; n < 2; ++n)
            ASSERT_TRUE(set.module_at(n == 0 ? "x" : "y", site)->low_rank(A[n], B[n], s));
          at::Tensor Am = p[0] * A[0] + p[1] * A[1], Bm = p[0] * B[0] + p[1] * B[1];
          want[b] += s * at::matmul(at::matmul(x[b], Am.t()), Bm.t());
        }
      }
      EXPECT_CLOSE(got, want, 2e-5) << what << " at " << site;
      EXPECT_CHANGED(got, h);
    }
  }
}

std::vector<Case> cases() {
  std::vector<Case> out;
  for (const std::string arch : {"gpt2", "llama", "bert", "moduleformer"})
    for (const auto& t : module_types())
      if (t.site_kind != SiteKind::embedding && t.site_kind != SiteKind::attention_kv && !t.on_members_sites)
        out.push_back({arch, t.name});
  return out;
}

INSTANTIATE_TEST_SUITE_P(AllTypes, EveryTypeRouted, testing::ValuesIn(cases()),
                         [](const testing::TestParamInfo<Case>& i) {
                           return i.param.arch + "_" + i.param.type;
                         });

// The combinations that make no sense, refused with the reason: a module that lengthens the sequence
// (prompt, prefix) cannot be one example's choice in a batch; a merged module is in every row already.
TEST(EveryTypeRouted, CombinationsThatMakeNoSenseAreRefusedWithTheReason) {
  const std::string model = test::tiny_checkpoint("llama");
  torch::NoGradGuard g;
  ModuleSet set(load_model(model));
  set.model()->eval();
  ModuleConfig prompt = config_for("prompt");
  prompt.prompt.num_virtual_tokens = 3;
  set.add("p", prompt);
  ModuleConfig lora = config_for("lora");
  set.add("l", lora);
  RoutingContext rc;
  rc.modules = {{{"p", 1.0}}, {}};
  EXPECT_THROW_WITH(run(*set.model(), ids_batch(2), rc), "keep shapes");
  ModuleConfig prefix = config_for("prefix");
  prefix.prefix.num_virtual_tokens = 3;
  set.add("k", prefix);
  rc.modules = {{{"k", 1.0}}, {}};
  EXPECT_THROW_WITH(run(*set.model(), ids_batch(2), rc), "'k' is a prefix", "cannot be chosen per example");
  set.merge("l");
  rc.modules = {{{"l", 1.0}}, {}};
  EXPECT_THROW_WITH(run(*set.model(), ids_batch(2), rc), "module 'l' is merged");
}

}  // namespace
}  // namespace mdl
