// Algorithm 1 for every module type that keeps shapes, on GPT-2, Llama and BERT: under each router a site
// has for ordinary modules (the active modules with their scales, for every row; each example's own
// ordered, weighted list), with both aggregations (a weighted sum of changes; a stack in the written
// order), one batch equals a plain reference loop: each example alone, through a fresh model holding
// only its modules, loaded in its order with its weights. Additive types commute (the table's `additive`
// means that); prompts and prefixes, which lengthen the sequence, are refused per example with the reason.
#include <ATen/ATen.h>
#include <torch/utils.h>

#include <nlohmann/json.hpp>

#include "backbones/fixtures.h"
#include "modules/module_fixtures.h"
#include "mdl/backbones/model.h"
#include "mdl/modules/module_set.h"
#include "mdl/modules/module_type.h"
#include "mdl/modules/targets.h"
#include "mdl/routing/routing_context.h"

namespace mdl {
namespace {

struct Case {
  std::string arch, type;
};
std::ostream& operator<<(std::ostream& os, const Case& c) { return os << c.arch << "_" << c.type; }

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

at::Tensor ids_batch(int64_t rows) { return (at::arange(0, rows * 6, at::kLong).view({rows, 6}) * 7) % 50 + 3; }

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
    EXPECT_CLOSE(flagged.narrow(0, b, 1), reference(model, dir.path(), ids.narrow(0, b, 1), {{"y", 1.3}, {"x", 0.7}}, tasks[b]),
                 2e-5)
        << "active modules, row " << b;

  // Router 2: each example's own ordered, weighted list; sums and stacks, with an adapter either side.
  set.set_active("z", true);
  set.set_scale("x", 1.0);
  set.set_scale("y", 1.0);
  const std::vector<std::vector<ModuleChoice>> lists = {
      {{"x", 1.0}}, {{"y", 0.5}, {"x", 1.0}}, {{"x", 1.0}, {"y", 0.5}}, {{"x", 1.0}, {"z", 1.0}}, {{"z", 1.0}, {"y", -0.8}}, {}};
  RoutingContext per_example;
  per_example.task_ids = task_ids;
  per_example.modules = lists;
  const at::Tensor mixed = run(*set.model(), ids, per_example);
  std::vector<at::Tensor> want;
  for (int64_t b = 0; b < 6; ++b) {
    want.push_back(reference(model, dir.path(), ids.narrow(0, b, 1), lists[static_cast<size_t>(b)], tasks[b]));
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

std::vector<Case> cases() {
  std::vector<Case> out;
  for (const std::string arch : {"gpt2", "llama", "bert"})
    for (const auto& t : module_types())
      if (t.site_kind != SiteKind::embedding && t.site_kind != SiteKind::attention_kv && !t.on_members_sites)
        out.push_back({arch, t.name});
  return out;
}

INSTANTIATE_TEST_SUITE_P(AllTypes, EveryTypeRouted, testing::ValuesIn(cases()),
                         [](const testing::TestParamInfo<Case>& i) { return i.param.arch + "_" + i.param.type; });

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
