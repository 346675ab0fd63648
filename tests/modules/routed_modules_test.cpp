// Modules with routing inside: Polytropon / MHR skill LoRAs (gradients reach the allocation; a one-hot
// allocation equals a plain LoRA of that skill), a mixture of LoRAs and SMEAR against brute force, and
// fixed routing by per-example module names (a mixed batch equals each example run alone).
#include <ATen/ATen.h>
#include <torch/utils.h>

#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

#include "backbones/fixtures.h"
#include "mdl/modules/lora.h"
#include "mdl/modules/lora_bank.h"
#include "mdl/modules/module_set.h"
#include "mdl/routing/routing_context.h"
#include "mdl/routing/routing_log.h"
#include "modules/module_fixtures.h"

namespace mdl {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

at::Tensor ids_batch() {
  return at::arange(3, 27, at::kLong).view({3, 8}) % 50 + 3;
}

at::Tensor run(ModelImpl& m, const at::Tensor& ids, const RoutingContext* rc = nullptr,
               RoutingLog* log = nullptr) {
  ModelInput in;
  in.input_ids = ids;
  in.routing = rc;
  in.routing_log = log;
  return m.forward(in);
}

void randomize(ModuleSet& set, const std::string& name, uint64_t seed) {
  torch::NoGradGuard g;
  at::manual_seed(static_cast<int64_t>(seed));
  for (auto& [k, t] : set.tensors(name))
    if (k.find("allocation") == std::string::npos) t.copy_(at::randn_like(t) * 0.2);
}

ModuleConfig poly_config(int64_t tasks, int64_t skills, int64_t heads) {
  ModuleConfig c;
  c.type = "poly_lora";
  c.poly.num_tasks = tasks;
  c.poly.num_skills = skills;
  c.poly.heads = heads;
  c.poly.r = 2;
  c.poly.alpha = 4;
  c.targets.target_modules = {"q_proj", "v_proj", "down_proj"};
  return c;
}

TEST(PolyLora, GradientsReachTheAllocation) {
  ModuleSet set(load_model(test::tiny_checkpoint("llama")));
  set.add("poly", poly_config(3, 4, 1));
  randomize(set, "poly", 1);
  set.freeze_base({"poly"});
  set.model()->train();
  RoutingContext rc;
  rc.task_ids = at::tensor({0, 2, 1}, at::kLong);
  RoutingLog log;
  run(*set.model(), ids_batch(), &rc, &log).pow(2).mean().backward();
  int with_grad = 0;
  for (const auto& [k, t] : set.tensors("poly"))
    if (k.find("allocation") != std::string::npos) {
      ASSERT_TRUE(t.grad().defined()) << k;
      with_grad += t.grad().abs().sum().item<double>() > 0;
    }
  EXPECT_EQ(with_grad, 3 * 2);  // one allocation per site: 2 layers x 3 targets
  EXPECT_EQ(log.stats().size(), 6u);
}

TEST(PolyLora, OneHotAllocationEqualsThatSkillsLora) {
  ModuleSet set(load_model(test::tiny_checkpoint("llama")));
  set.add("poly", poly_config(2, 3, 1));
  randomize(set, "poly", 2);
  set.model()->eval();
  const int64_t task = 1, skill = 2;
  ModuleConfig lora;
  lora.lora.r = 2;
  lora.lora.alpha = 4;
  lora.targets = set.config("poly").targets;
  ModuleSet ref(load_model(test::tiny_checkpoint("llama")));
  ref.add("lora", lora);
  {
    torch::NoGradGuard g;
    auto poly = set.tensors("poly");
    for (const auto& site : set.sites("poly")) {
      at::Tensor alloc = poly.at(site + ".allocation.allocation");  // (tasks, heads, skills)
      alloc.fill_(-kInf);
      alloc[task][0][skill] = kInf;
      auto t = ref.tensors("lora");
      t.at(site + ".lora_A").copy_(poly.at(site + ".lora_A")[skill]);
      t.at(site + ".lora_B").copy_(poly.at(site + ".lora_B")[skill]);
    }
  }
  torch::NoGradGuard g;
  RoutingContext rc;
  rc.task_ids = at::full({3}, task, at::kLong);
  at::Tensor got = run(*set.model(), ids_batch(), &rc);
  at::Tensor want = run(*ref.model(), ids_batch());
  EXPECT_TRUE(at::allclose(got, want, 1e-5, 1e-5)) << (got - want).abs().max();
  set.set_active("poly", false);
  EXPECT_FALSE(at::allclose(got, run(*set.model(), ids_batch()), 1e-5, 1e-5))
      << "the skill must change the output";
}

TEST(PolyLora, MhrHeadsTakeTheirColumnsFromTheirSkill) {
  ModuleSet set(load_model(test::tiny_checkpoint("llama")));
  set.add("mhr", poly_config(1, 2, 2));
  randomize(set, "mhr", 3);
  const std::string site = set.sites("mhr")[0];
  auto part = std::dynamic_pointer_cast<PolyLoraImpl>(set.module_at("mhr", site));
  at::Tensor w = at::zeros({1, 2, 2});
  w[0][0][0] = 1, w[0][1][1] = 1;  // head 0 -> skill 0, head 1 -> skill 1
  auto [a, b] = part->task_factors(w);
  const int64_t in = part->A.size(2), out = part->B.size(1);
  EXPECT_TRUE(at::equal(a[0].narrow(1, 0, in / 2), part->A[0].narrow(1, 0, in / 2)));
  EXPECT_TRUE(at::equal(a[0].narrow(1, in / 2, in / 2), part->A[1].narrow(1, in / 2, in / 2)));
  EXPECT_TRUE(at::equal(b[0].narrow(0, 0, out / 2), part->B[0].narrow(0, 0, out / 2)));
  EXPECT_TRUE(at::equal(b[0].narrow(0, out / 2, out / 2), part->B[1].narrow(0, out / 2, out / 2)));
  // Training samples a relaxed Bernoulli; rows still sum to one per head.
  at::Tensor sampled = part->allocation()->weights(at::zeros({4}, at::kLong), true);
  EXPECT_TRUE(at::allclose(sampled.sum(-1), at::ones({4, 2}), 1e-5));
}

TEST(PolyLora, NeedsTaskIdsAndSharesAllocationWhenAsked) {
  ModuleSet set(load_model(test::tiny_checkpoint("llama")));
  ModuleConfig c = poly_config(2, 2, 1);
  c.poly.shared_allocation = true;
  set.add("poly", c);
  int allocations = 0;
  for (const auto& [k, t] : set.tensors("poly")) allocations += k.find("allocation") != std::string::npos;
  EXPECT_EQ(allocations, 1);
  torch::NoGradGuard g;
  EXPECT_THROW_WITH(run(*set.model(), ids_batch()),
                    "[routing] 'model.layers.0.self_attn.q_proj' routes by task: pass task ids");
  RoutingContext rc;
  rc.task_ids = at::tensor({0, 5, 1}, at::kLong);
  EXPECT_THROW_WITH(run(*set.model(), ids_batch(), &rc), "task id 5 out of range", "2 tasks");
}

// Brute force: per token, the router's top-2 over softmax(gate x), sum of w_e s B_e A_e x.
TEST(LoraMixture, EqualsPerTokenBruteForce) {
  ModuleSet set(load_model(test::tiny_checkpoint("llama")));
  ModuleConfig c =
      nlohmann::json({{"type", "lora_moe"},
                      {"options", {{"experts", 4}, {"r", 3}, {"lora_alpha", 6}}},
                      {"targets", {{"target_modules", {"q_proj"}}, {"layers_to_transform", {0}}}}})
          .get<ModuleConfig>();
  set.add("mix", c);
  randomize(set, "mix", 4);
  auto part = std::dynamic_pointer_cast<LoraMixtureImpl>(set.module_at("mix", set.sites("mix")[0]));
  torch::NoGradGuard g;
  at::Tensor x = at::randn({2, 5, part->A.size(2)});
  at::Tensor got = part->forward(x, at::zeros({2, 5, part->B.size(1)}));
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t t = 0; t < 5; ++t) {
      at::Tensor xt = x[b][t];
      at::Tensor p = at::softmax(at::mv(part->gate, xt), 0);
      auto [w, idx] = p.topk(2);
      w = w / w.sum();
      at::Tensor want = at::zeros({part->B.size(1)});
      for (int64_t j = 0; j < 2; ++j) {
        const int64_t e = idx[j].item<int64_t>();
        want += w[j] * 2.0 * at::mv(part->B[e], at::mv(part->A[e], xt));
      }
      EXPECT_TRUE(at::allclose(got[b][t], want, 1e-5, 1e-6)) << b << "," << t;
    }
}

TEST(LoraMixture, SmearAveragesParametersPerExample) {
  ModuleSet set(load_model(test::tiny_checkpoint("llama")));
  ModuleConfig c =
      nlohmann::json({{"type", "lora_moe"},
                      {"options",
                       {{"experts", 3},
                        {"r", 2},
                        {"lora_alpha", 2},
                        {"smear", true},
                        {"router", {{"kind", "softmax"}, {"level", "example"}}}}},
                      {"targets", {{"target_modules", {"v_proj"}}, {"layers_to_transform", {1}}}}})
          .get<ModuleConfig>();
  set.add("smear", c);
  randomize(set, "smear", 5);
  auto part = std::dynamic_pointer_cast<LoraMixtureImpl>(set.module_at("smear", set.sites("smear")[0]));
  torch::NoGradGuard g;
  at::Tensor x = at::randn({2, 4, part->A.size(2)});
  at::Tensor got = part->forward(x, at::zeros({2, 4, part->B.size(1)}));
  for (int64_t b = 0; b < 2; ++b) {
    at::Tensor p = at::softmax(at::mv(part->gate, x[b].mean(0)), 0);
    at::Tensor A = (p.view({3, 1, 1}) * part->A).sum(0), B = (p.view({3, 1, 1}) * part->B).sum(0);
    at::Tensor want = at::matmul(at::matmul(x[b], A.t()), B.t());
    EXPECT_TRUE(at::allclose(got[b], want, 1e-5, 1e-6));
  }
  c.lora_moe.router.level = "token";
  EXPECT_THROW_WITH(nlohmann::json(c).get<ModuleConfig>(), "smear averages parameters per example");
}

ModuleConfig lora_on(std::vector<std::string> targets) {
  ModuleConfig c;
  c.lora.r = 2;
  c.lora.init = "random";
  c.targets.target_modules = std::move(targets);
  return c;
}

// Stacking is in each example's order, whatever order the modules were loaded in: a batch whose rows name
// stack(a, b) and stack(b, a) of two bottleneck adapters gives each row what a set that loaded them in
// that order (so applies them in that order) gives, and the two orders differ.
TEST(FixedRouting, StacksApplyInEachExamplesOrderNotInLoadOrder) {
  const std::string model = test::tiny_checkpoint("llama");
  test::TempDir dir;
  test::save_random_adapters(model, dir.path(), {"a", "b"}, 11);
  torch::NoGradGuard g;
  const at::Tensor ids = ids_batch().narrow(0, 0, 1);
  auto in_order = [&](const std::vector<std::string>& order) {  // loaded, hence applied, in this order
    ModuleSet set(load_model(model));
    for (const auto& n : order) set.load(dir / n);
    return run(*set.model(), ids);
  };
  const at::Tensor ab = in_order({"a", "b"}), ba = in_order({"b", "a"});
  EXPECT_CHANGED(ab, ba);
  ModuleSet set(load_model(model));
  set.load(dir / "b");  // loaded in the order neither row names first
  set.load(dir / "a");
  RoutingContext rc;
  rc.modules = {{{"a", 1.0}, {"b", 1.0}}, {{"b", 1.0}, {"a", 1.0}}, {{"a", 1.0}, {"b", 1.0}}};
  const at::Tensor mixed = run(*set.model(), ids.repeat({3, 1}), &rc);
  EXPECT_CLOSE(mixed.narrow(0, 0, 1), ab, 1e-5);
  EXPECT_CLOSE(mixed.narrow(0, 1, 1), ba, 1e-5);
  EXPECT_CLOSE(mixed.narrow(0, 2, 1), ab, 1e-5);
}

// One batch whose examples use different modules equals each example run alone with its modules.
TEST(FixedRouting, MixedBatchEqualsPerExampleRuns) {
  ModuleSet set(load_model(test::tiny_checkpoint("llama")));
  set.add("a", lora_on({"q_proj", "v_proj"}));
  set.add("b", lora_on({"v_proj", "o_proj"}));
  ModuleConfig adapter;
  adapter.type = "adapter";
  set.add("c", adapter);
  randomize(set, "c", 6);
  set.model()->eval();
  torch::NoGradGuard g;
  const std::vector<std::vector<ModuleChoice>> choices = {{{"a", 1.0}}, {{"b", 0.5}, {"c", 1.0}}, {}};
  RoutingContext rc;
  rc.modules = choices;
  at::Tensor ids = ids_batch();
  at::Tensor mixed = run(*set.model(), ids, &rc);
  for (int64_t b = 0; b < 3; ++b) {
    for (const auto& n : set.names()) set.set_active(n, false), set.set_scale(n, 1.0);
    for (const auto& c : choices[b]) set.set_active(c.name, true), set.set_scale(c.name, c.scale);
    at::Tensor alone = run(*set.model(), ids.narrow(0, b, 1));
    EXPECT_TRUE(at::allclose(mixed.narrow(0, b, 1), alone, 1e-5, 1e-5)) << "example " << b;
  }
  // By task id through a table, the same thing.
  RoutingContext by_task = RoutingContext::by_id(at::tensor({0, 1, 2}, at::kLong), choices);
  EXPECT_TRUE(at::allclose(run(*set.model(), ids, &by_task), mixed));
  EXPECT_THROW_WITH(RoutingContext::by_id(at::tensor({3}, at::kLong), choices), "task id 3", "3 entries");
  rc.modules.pop_back();
  EXPECT_THROW_WITH(run(*set.model(), ids, &rc), "names modules for 2 examples but the batch has 3");
  rc.modules = choices;
  set.merge("a");
  EXPECT_THROW_WITH(run(*set.model(), ids, &rc), "module 'a' is merged", "unmerge it");
}

/// The tiny Llama with LoRAs "r2", "r4" and "r8" (random, non-zero) on every projection, in eval mode.
ModuleSet ranked_loras() {
  ModuleSet set(load_model(test::tiny_checkpoint("llama")));
  for (const auto& [name, r] :
       std::vector<std::pair<std::string, int64_t>>{{"r2", 2}, {"r4", 4}, {"r8", 8}}) {
    ModuleConfig c = lora_on({"all-linear"});
    c.lora.r = r;
    c.seed = static_cast<uint64_t>(r);
    set.add(name, c);
  }
  set.model()->eval();
  return set;
}

// Heterogeneous LoRA batches go through the gathered bank (two small products per row and site): LoRAs of
// ranks 2, 4 and 8, a row with two LoRAs at different scales, a row with none; every row equals its own run,
// and so does the row-subset path the bank replaces (taken with gradients on).
TEST(FixedRouting, GatheredLorasOfDifferentRanksEqualPerExampleRuns) {
  ModuleSet set = ranked_loras();
  const std::vector<std::vector<ModuleChoice>> choices = {
      {{"r8", 1.0}}, {{"r2", 1.0}}, {{"r4", 0.5}, {"r8", 2.0}}, {}, {{"r4", 1.0}}};
  RoutingContext rc;
  rc.modules = choices;
  at::Tensor ids = at::arange(0, 40, at::kLong).view({5, 8}) % 50 + 3;
  at::Tensor gathered;
  {
    torch::NoGradGuard g;
    gathered = run(*set.model(), ids, &rc);
  }
  at::Tensor subsets = run(*set.model(), ids, &rc).detach();  // grad mode: LoRA weights need gradients
  EXPECT_TRUE(at::allclose(gathered, subsets, 1e-5, 1e-5)) << (gathered - subsets).abs().max().item<double>();
  torch::NoGradGuard g;
  for (int64_t b = 0; b < 5; ++b) {
    for (const auto& n : set.names()) set.set_active(n, false), set.set_scale(n, 1.0);
    for (const auto& c : choices[b]) set.set_active(c.name, true), set.set_scale(c.name, c.scale);
    at::Tensor alone = run(*set.model(), ids.narrow(0, b, 1));
    EXPECT_TRUE(at::allclose(gathered.narrow(0, b, 1), alone, 1e-5, 1e-5)) << "example " << b;
  }
  // Weights changed in place are seen: the bank restacks.
  for (const auto& n : set.names()) set.set_active(n, true), set.set_scale(n, 1.0);
  auto part = std::dynamic_pointer_cast<LoraImpl>(set.module_at("r8", set.sites("r8")[0]));
  ASSERT_TRUE(part);
  part->B.add_(0.5);
  at::Tensor changed = run(*set.model(), ids, &rc);
  EXPECT_FALSE(at::allclose(changed.narrow(0, 0, 1), gathered.narrow(0, 0, 1), 1e-5, 1e-5));
  EXPECT_TRUE(
      at::allclose(changed.narrow(0, 1, 1), gathered.narrow(0, 1, 1), 1e-5, 1e-5));  // row 1 has no r8
}

// The bank on its own against the LoRA equations: ranks 3, 5 and 16 (padded), an output width that is
// not a multiple of 8 (the vector kernel's tail), decoding rows (T = 1) and prompt rows (T = 3), in
// float32 (exact up to summation order) and float16 storage (rounding of the factors only).
TEST(LoraBank, MatchesTheLoraEquationsInBothStorages) {
  const int64_t in = 24, out = 13;
  std::vector<LoraBank::Factors> loras;
  for (int64_t r : {3, 5, 16})
    loras.push_back({at::randn({r, in}, at::kFloat) * 0.3, at::randn({out, r}, at::kFloat) * 0.2, 2.0 / r});
  const std::vector<int64_t> idx = {0, 1, 2, 3, 1, 0};  // 3: the "no LoRA" entry
  const std::vector<double> scale = {1.0, 0.5, 1.0, 1.0, 2.0, 0.0};
  LoraBank bank;
  for (at::ScalarType storage : {at::kFloat, at::kHalf, at::kFloat}) {
    bank.update(loras, storage);
    EXPECT_EQ(bank.none(), 3);
    for (int64_t T : {1, 3}) {
      at::Tensor x = at::randn({6, T, in}), current = at::randn({6, T, out});
      at::Tensor got = bank.apply(x, current, at::tensor(idx, at::kLong), at::tensor(scale, at::kDouble));
      for (int64_t b = 0; b < 6; ++b) {
        at::Tensor want = current[b].clone();
        if (idx[b] < 3) {
          const auto& f = loras[static_cast<size_t>(idx[b])];
          want += scale[b] * f.scaling * at::matmul(at::matmul(x[b], f.A.t()), f.B.t());
        }
        const double tol = storage == at::kHalf ? 3e-3 : 1e-5;  // float16: 2^-11 on each factor
        EXPECT_TRUE(at::allclose(got[b], want, tol, tol))
            << "storage " << c10::toString(storage) << ", T " << T << ", row " << b << ": "
            << (got[b] - want).abs().max().item<double>();
      }
    }
  }
  EXPECT_THROW_WITH(bank.update(loras, at::kDouble), "storage must be float32 or float16", "Double");
}

// Decoding steps (one position per row) of a mixed batch with the float16 bank: every row within the
// factors' rounding of its own run.
TEST(FixedRouting, DecodingRowsThroughTheFloat16BankEqualPerExampleRuns) {
  ModuleSet set = ranked_loras();
  torch::NoGradGuard g;
  const std::vector<std::vector<ModuleChoice>> choices = {
      {{"r8", 1.0}}, {{"r2", 1.0}}, {{"r4", 0.5}, {"r8", 2.0}}, {}};
  set.set_lora_bank_storage(at::kHalf);
  RoutingContext rc;
  rc.modules = choices;
  at::Tensor ids = at::tensor({5, 17, 29, 41}, at::kLong).view({4, 1});
  at::Tensor mixed = run(*set.model(), ids, &rc);
  for (int64_t b = 0; b < 4; ++b) {
    for (const auto& n : set.names()) set.set_active(n, false), set.set_scale(n, 1.0);
    for (const auto& c : choices[b]) set.set_active(c.name, true), set.set_scale(c.name, c.scale);
    at::Tensor alone = run(*set.model(), ids.narrow(0, b, 1));
    EXPECT_TRUE(at::allclose(mixed.narrow(0, b, 1), alone, 1e-3, 1e-3))
        << "example " << b << ": " << (mixed.narrow(0, b, 1) - alone).abs().max().item<double>();
  }
}

}  // namespace
}  // namespace mdl
