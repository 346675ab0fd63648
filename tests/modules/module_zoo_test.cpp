// Every module type: a new module leaves the logits unchanged, an optimiser step changes only module
// parameters, native save/load is bit-exact, the trainable count equals its closed form.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/optim/sgd.h>
#include <torch/utils.h>

#include <nlohmann/json.hpp>
#include <set>

#include "backbones/fixtures.h"
#include "mdl/io/safetensors.h"
#include "mdl/modules/module_set.h"
#include "mdl/routing/routing_context.h"

namespace mdl {
namespace {

struct Case {
  std::string label;
  std::string arch;
  nlohmann::json config;
};

std::ostream& operator<<(std::ostream& os, const Case& c) {
  return os << c.label;
}

at::Tensor logits(ModelImpl& m) {
  ModelInput in;
  in.input_ids = at::arange(3, 15, at::kLong).view({2, 6});
  return m.forward(in);
}

// The closed-form count of trainable parameters a module should have on `model`.
int64_t closed_form(const ModuleSet& set, const std::string& name) {
  const ModuleConfig& c = set.config(name);
  int64_t n = 0;
  for (const auto& s : set.sites(name)) {
    const SiteInfo& info = set.model()->site(s).info();
    const int64_t in = info.in_features, out = info.out_features;
    if (c.type == "lora") {
      const int64_t r = c.lora.rank_alpha_for(s).first;
      n += r * (in + out) + (c.lora.bias ? out : 0) + (c.lora.use_dora ? out : 0);
    } else if (c.type == "ia3") {
      n += c.ia3.is_feedforward(s) ? in : out;
    } else if (c.type == "adapter") {
      const int64_t b = std::max<int64_t>(1, out / c.adapter.reduction_factor);
      n += out * b + b + b * out + out + (c.adapter.layer_norm ? 2 * out : 0);
    } else if (c.type == "lora_moe") {
      const LoraMixtureOptions& m = c.lora_moe;
      n += m.experts * m.r * (in + out) + m.experts * in +
           (m.router.level == "task" ? m.num_tasks * m.experts : 0);
    } else if (c.type == "bitfit") {
      n += out;
    } else if (c.type == "layernorm") {
      n += set.model()->norm(s).bias.defined() ? 2 * out : out;
    } else if (c.type == "compacter") {
      const int64_t k = c.compacter.phm_dim, r = c.compacter.phm_rank;
      const int64_t b = std::max<int64_t>(k, (out / c.compacter.reduction_factor) / k * k);
      n += k * (out / k) * r + k * r * (b / k) + b + k * (b / k) * r + k * r * (out / k) + out;
    }
  }
  if (c.type == "compacter")
    n += 2 * c.compacter.phm_dim * c.compacter.phm_dim * c.compacter.phm_dim;  // shared rules
  if (c.type == "hyper_lora") {                                                // one shared generator
    const HyperLoraOptions& h = c.hyper;
    const int64_t sites = static_cast<int64_t>(set.sites(name).size());
    n += h.num_tasks * h.task_embedding_dim + sites * h.site_embedding_dim +
         h.hidden * (h.task_embedding_dim + h.site_embedding_dim) + h.hidden;
    std::set<std::pair<int64_t, int64_t>> shapes;
    for (const auto& s : set.sites(name))
      shapes.insert({set.model()->site(s).info().in_features, set.model()->site(s).info().out_features});
    for (auto [in, out] : shapes) n += (h.r * in) * (h.hidden + 1) + (out * h.r) * (h.hidden + 1);
  }
  return n;
}

class ModuleZoo : public ::testing::TestWithParam<Case> {};

TEST_P(ModuleZoo, NewModuleIsIdentityStepTouchesOnlyModuleSaveLoadIsExact) {
  const Case& tc = GetParam();
  const std::string dir = test::tiny_checkpoint(tc.arch);
  ModuleSet set(load_model(dir));
  ModuleConfig config = tc.config.get<ModuleConfig>();
  at::Tensor base;
  {
    torch::NoGradGuard g;
    base = logits(*set.model());
  }
  set.add("m", config);
  set.freeze_base({"m"});
  {
    torch::NoGradGuard g;
    EXPECT_CLOSE(logits(*set.model()), base, 1e-6) << ": a new module must leave the logits unchanged";
  }
  const ParameterSummary summary = set.summary();
  EXPECT_EQ(summary.trainable, closed_form(set, "m")) << summary.to_string();
  EXPECT_EQ(summary.total, set.model()->num_parameters() + closed_form(set, "m"));

  // One optimiser step.
  std::map<std::string, at::Tensor> base_before;
  for (const auto& item : set.model()->named_parameters())
    base_before[item.key()] = item.value().detach().clone();
  std::map<std::string, at::Tensor> module_before;
  for (const auto& [k, t] : set.tensors("m")) module_before[k] = t.detach().clone();
  torch::optim::SGD opt(set.parameters({"m"}), torch::optim::SGDOptions(0.5));
  set.model()->train();
  at::Tensor loss = logits(*set.model()).pow(2).mean();
  loss.backward();
  opt.step();
  set.model()->eval();
  for (const auto& item : set.model()->named_parameters()) {
    EXPECT_FALSE(item.value().grad().defined()) << "frozen " << item.key() << " received a gradient";
    EXPECT_TRUE(at::equal(item.value(), base_before.at(item.key()))) << item.key() << " changed";
  }
  int changed = 0;
  for (const auto& [k, t] : set.tensors("m")) changed += !at::equal(t, module_before.at(k));
  EXPECT_GT(changed, 0) << "no module parameter changed";

  // Native save and load: bit-exact tensors and logits.
  test::TempDir tmp;
  set.save("m", tmp / "m");
  ModuleSet other(load_model(dir));
  EXPECT_EQ(other.load(tmp / "m"), "m");
  for (const auto& [k, t] : set.tensors("m")) EXPECT_TRUE(at::equal(t, other.tensors("m").at(k))) << k;
  torch::NoGradGuard g;
  EXPECT_TRUE(at::equal(logits(*set.model()), logits(*other.model())));
  EXPECT_CHANGED(logits(*other.model()), base);
}

std::vector<Case> cases() {
  using nlohmann::json;
  return {
      {"lora_llama", "llama", {{"type", "lora"}}},
      {"lora_gpt2_all_linear_rslora",
       "gpt2",
       {{"type", "lora"},
        {"options", {{"r", 4}, {"lora_alpha", 16}, {"use_rslora", true}}},
        {"targets", {{"target_modules", "all-linear"}}}}},
      {"lora_bert_gaussian_patterns",
       "bert",
       {{"type", "lora"},
        {"options",
         {{"r", 2},
          {"init_lora_weights", "gaussian"},
          {"rank_pattern", {{"value", 6}}},
          {"alpha_pattern", {{"query", 3.0}}}}}}},
      {"lora_bias", "llama", {{"type", "lora"}, {"options", {{"lora_bias", true}}}}},
      {"dora",
       "llama",
       {{"type", "lora"},
        {"options", {{"use_dora", true}, {"r", 4}}},
        {"targets", {{"target_modules", {"q_proj", "o_proj", "down_proj"}}}}}},
      {"ia3_llama", "llama", {{"type", "ia3"}}},
      {"ia3_gpt2", "gpt2", {{"type", "ia3"}}},
      {"adapter_pfeiffer", "llama", {{"type", "adapter"}, {"options", {{"reduction_factor", 8}}}}},
      {"adapter_houlsby_bert",
       "bert",
       {{"type", "adapter"}, {"options", {{"config", "houlsby"}, {"non_linearity", "gelu"}}}}},
      {"adapter_parallel_ln",
       "gpt2",
       {{"type", "adapter"}, {"options", {{"config", "parallel"}, {"scaling", 4.0}, {"layer_norm", true}}}}},
      {"bitfit", "gpt2", {{"type", "bitfit"}}},
      {"layernorm_bert", "bert", {{"type", "layernorm"}}},
      {"hyper_lora_llama", "llama", {{"type", "hyper_lora"}, {"options", {{"num_tasks", 3}, {"r", 2}}}}},
      {"compacter_pp_llama", "llama", {{"type", "compacter"}, {"options", {{"reduction_factor", 8}}}}},
      {"compacter_houlsby_gpt2",
       "gpt2",
       {{"type", "compacter"},
        {"options", {{"config", "houlsby"}, {"phm_dim", 8}, {"phm_rank", 2}, {"reduction_factor", 4}}}}},
      {"layernorm_llama_rms", "llama", {{"type", "layernorm"}}},
      {"lora_moe_top2", "llama", {{"type", "lora_moe"}, {"options", {{"experts", 4}, {"r", 2}}}}},
      {"lora_moe_switch_gpt2",
       "gpt2",
       {{"type", "lora_moe"}, {"options", {{"experts", 3}, {"r", 2}, {"router", {{"kind", "switch"}}}}}}},
      {"lora_moe_smear",
       "llama",
       {{"type", "lora_moe"},
        {"options",
         {{"experts", 3}, {"smear", true}, {"router", {{"kind", "softmax"}, {"level", "example"}}}}}}},
  };
}

INSTANTIATE_TEST_SUITE_P(Types, ModuleZoo, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.label; });

// Whether the autograd graph behind `t` has a node whose name contains `what`.
bool graph_has(const at::Tensor& t, const std::string& what) {
  std::vector<torch::autograd::Node*> todo{t.grad_fn().get()};
  std::set<torch::autograd::Node*> seen;
  while (!todo.empty()) {
    torch::autograd::Node* n = todo.back();
    todo.pop_back();
    if (!n || !seen.insert(n).second) continue;
    if (n->name().find(what) != std::string::npos) return true;
    for (const auto& e : n->next_edges()) todo.push_back(e.function.get());
  }
  return false;
}

// LoRA's own autograd nodes: after the projection on few rows (LoraDeltaFn in training), folded into it on
// many (LoraLinearFn: x (W + s B A)^T + b, in training and in evaluation). The reference composes the
// equations from at:: ops: evaluation through per-example routing, which runs each module after the
// projection. Same output and every gradient, with a frozen and a trainable base (weights and biases).
TEST(Lora, TrainingNodesEqualTheComposedEquationsInEveryGradient) {
  for (const std::string arch : {"llama", "gpt2"})
    for (int64_t rows : {12, 96})
      for (bool frozen_base : {false, true}) {
        const std::string label = arch + " rows " + std::to_string(rows) + (frozen_base ? " frozen" : "");
        ModuleSet set(load_model(test::tiny_checkpoint(arch)));
        ModuleConfig c;
        c.lora.r = 4;
        c.lora.alpha = 8;
        c.lora.init = "random";
        c.targets.target_modules = {"all-linear"};
        set.add("lora", c);
        if (frozen_base) set.freeze_base({"lora"});
        std::vector<at::Tensor> params = set.model()->parameters();
        for (auto& p : set.parameters({"lora"})) params.push_back(p);
        ModelInput in;
        in.input_ids = (at::arange(rows, at::kLong) * 7 + 3)
                           .remainder(set.model()->config().vocab_size)
                           .view({rows / 6, 6});
        RoutingContext every_example;  // the reference: each example names the LoRA
        every_example.modules.assign(static_cast<size_t>(rows / 6), {{"lora", 1.0}});
        std::vector<at::Tensor> grads[2];
        at::Tensor out[2];
        for (bool training : {true, false}) {
          set.model()->train(training);
          ModelInput run = in;
          if (!training) run.routing = &every_example;
          out[training] = set.model()->forward(run);
          at::Tensor loss = out[training].pow(2).mean();
          // 12 rows stay under every projection's threshold, 96 are over it; the reference never folds
          EXPECT_EQ(graph_has(loss, "LoraLinearFn"), training && rows == 96) << label;
          loss.backward();
          for (auto& p : params) {
            if (!p.requires_grad()) continue;
            grads[training].push_back(p.grad().clone());
            p.mutable_grad() = at::Tensor();
          }
        }
        EXPECT_LT((out[true] - out[false]).abs().max().item<double>(), 1e-5) << label;
        ASSERT_EQ(grads[true].size(), grads[false].size()) << label;
        for (size_t i = 0; i < grads[true].size(); ++i)
          EXPECT_TRUE(at::allclose(grads[true][i], grads[false][i], 1e-4, 1e-6))
              << label << " gradient " << i;
        // Evaluation without a gradient folds too (no node), with the same output.
        torch::NoGradGuard no_grad;
        set.model()->eval();
        EXPECT_LT((set.model()->forward(in) - out[false]).abs().max().item<double>(), 1e-5) << label;
      }
}

TEST(HyperLora, TasksMaterializeAndNewTasksFromAnEmbedding) {
  ModuleSet set(load_model(test::tiny_checkpoint("llama")));
  ModuleConfig c =
      nlohmann::json{{"type", "hyper_lora"}, {"options", {{"num_tasks", 2}, {"r", 2}}}}.get<ModuleConfig>();
  set.add("h", c);
  set.freeze_base({"h"});
  torch::optim::SGD opt(set.parameters({"h"}), torch::optim::SGDOptions(0.5));
  for (int task : {0, 1}) {
    set.set_task("h", task);
    opt.zero_grad();
    ((logits(*set.model()) - task).pow(2).mean()).backward();
    opt.step();
  }
  torch::NoGradGuard g;
  set.set_task("h", 0);
  at::Tensor t0 = logits(*set.model());
  set.set_task("h", 1);
  at::Tensor t1 = logits(*set.model());
  EXPECT_FALSE(at::allclose(t0, t1));
  set.materialize("h", "task1");  // a plain LoRA with what the generator makes for task 1
  EXPECT_EQ(set.config("task1").type, "lora");
  set.set_active("h", false);
  EXPECT_LE((logits(*set.model()) - t1).abs().max().item<double>(), 1e-6);
  set.set_active("task1", false);
  set.set_active("h", true);
  set.set_task_embedding("h", at::randn({16}, at::detail::createCPUGenerator(3)));  // a new task, no training
  at::Tensor fresh = logits(*set.model());
  EXPECT_FALSE(at::allclose(fresh, t0));
  EXPECT_THROW_WITH(set.set_task("h", 5), "task 5 is not in [0, 2)");
  EXPECT_THROW_WITH(set.set_task_embedding("h", at::zeros({3})), "16 values");
  EXPECT_THROW_WITH(set.set_task("task1", 0), "not a hypernetwork");
}

TEST(Compacter, PhmWeightIsASumOfKroneckerProducts) {
  auto gen = at::detail::createCPUGenerator(4);
  at::Tensor rule = at::randn({4, 4, 4}, gen), left = at::randn({4, 6, 2}, gen),
             right = at::randn({4, 2, 3}, gen);
  at::Tensor want = at::zeros({24, 12});
  for (int i = 0; i < 4; ++i) want += at::kron(rule[i], left[i].mm(right[i]));
  EXPECT_LE((phm_weight(rule, left, right) - want).abs().max().item<double>(), 1e-5);
  EXPECT_THROW_WITH(
      nlohmann::json({{"type", "compacter"}, {"options", {{"config", "lstm"}}}}).get<ModuleConfig>(),
      "config 'lstm' is unknown");
}

TEST(ModuleSet, TargetsActivationScalesAndErrors) {
  ModuleSet set(load_model(test::tiny_checkpoint("llama")));
  ModuleConfig c;
  c.targets.target_modules = {"q_proj", "self_attn.v_proj"};
  c.targets.layers_to_transform = {1};
  c.lora.init = "random";
  set.add("a", c);
  EXPECT_EQ(set.sites("a"),
            (std::vector<std::string>{"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}));
  ModuleConfig all;
  all.targets.target_modules = {"all-linear"};
  all.targets.exclude_modules = {"mlp.up_proj"};
  all.lora.init = "random";
  all.seed = 5;
  set.add("b", all);
  EXPECT_EQ(set.sites("b").size(), 2u * 6);  // 7 projections per layer minus up_proj; lm_head excluded
  ModuleConfig regex;
  regex.targets.target_regex = R"(model\.layers\.0\.mlp\.(gate|down)_proj)";
  set.add("c", regex);
  EXPECT_EQ(set.sites("c").size(), 2u);

  torch::NoGradGuard g;
  set.set_active("a", false), set.set_active("b", false), set.set_active("c", false);
  at::Tensor base = logits(*set.model());
  set.set_active("a", true);
  at::Tensor with_a = logits(*set.model());
  EXPECT_CHANGED(with_a, base);
  set.set_scale("a", 0.0);
  EXPECT_CLOSE(logits(*set.model()), base, 1e-6);
  set.set_scale("a", 1.0);
  set.set_active("b", true);
  EXPECT_CHANGED(logits(*set.model()), with_a);
  set.remove("b");
  EXPECT_TRUE(at::allclose(logits(*set.model()), with_a));
  EXPECT_EQ(set.names(), (std::vector<std::string>{"a", "c"}));

  EXPECT_THROW_WITH(set.add("a", c), "already exists");
  ModuleConfig none;
  none.targets.target_modules = {"nonexistent_proj"};
  EXPECT_THROW_WITH(set.add("d", none), "no site of LlamaForCausalLM matches nonexistent_proj",
                    "model.layers.0.self_attn.q_proj");
  EXPECT_THROW_WITH(set.set_active("zzz", true), "no module named 'zzz'", "loaded: a, c");
  EXPECT_THROW_WITH(nlohmann::json({{"type", "lora"}, {"options", {{"r", 0}}}}).get<ModuleConfig>(),
                    "r must be > 0");
  EXPECT_THROW_WITH(nlohmann::json({{"type", "magic"}}).get<ModuleConfig>(), "unknown module type 'magic'");
  ModuleConfig adapter;
  adapter.type = "adapter";
  set.add("ad", adapter);
  EXPECT_THROW_WITH(set.merge("ad"), "cannot be merged");
}

TEST(ModuleSet, WrongBaseModelIsRefusedAndFingerprintMismatchOnlyWarns) {
  ModuleSet llama(load_model(test::tiny_checkpoint("llama")));
  llama.add("m", ModuleConfig());
  test::TempDir tmp;
  llama.save("m", tmp / "m");
  ModuleSet gpt2(load_model(test::tiny_checkpoint("gpt2")));
  EXPECT_THROW_WITH(gpt2.load(tmp / "m"), "needs site 'model.layers.0.self_attn.q_proj'", "GPT2LMHeadModel",
                    "another base model");
  EXPECT_TRUE(gpt2.names().empty());
  // Qwen2 tiny has the same q/v shapes: loads, with a warning.
  ModuleSet qwen(load_model(test::tiny_checkpoint("qwen2")));
  EXPECT_EQ(qwen.load(tmp / "m", "x"), "x");
  EXPECT_EQ(qwen.load(tmp / "m", "y", /*force=*/true), "y");
  // A tensor of the wrong shape names the tensor and both shapes.
  auto tensors = io::load_safetensors(tmp / "m/module.safetensors");
  tensors["model.layers.0.self_attn.q_proj.lora_A"] = at::zeros({8, 99});
  io::save_safetensors(tmp / "m/module.safetensors", tensors);
  EXPECT_THROW_WITH(llama.load(tmp / "m", "z"), "model.layers.0.self_attn.q_proj.lora_A", "[8, 99]",
                    "[8, 64]");
  EXPECT_FALSE(llama.contains("z"));
  EXPECT_THROW_WITH(llama.load(tmp.path() + "/nothing"), "is not a directory");
}

}  // namespace
}  // namespace mdl
