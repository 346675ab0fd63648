// Prompt tuning: a prompt made of real tokens' embeddings reproduces the logits of those tokens typed in
// front of the input; cached generation matches recomputation; training, files and PEFT's layout.
#include "mdl/modules/prompt_tuning.h"

#include <ATen/ATen.h>
#include <torch/optim/sgd.h>
#include <torch/utils.h>

#include <nlohmann/json.hpp>

#include "backbones/fixtures.h"
#include "mdl/backbones/generate.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/safetensors.h"
#include "mdl/modules/module_set.h"
#include "mdl/modules/peft_format.h"

namespace mdl {
namespace {

class Prompt : public ::testing::TestWithParam<std::string> {};

TEST_P(Prompt, EqualsTypingThePromptTokens) {
  const std::string arch = GetParam();
  ModuleSet set(load_model(test::tiny_checkpoint(arch)));
  ModuleConfig c;
  c.type = "prompt";
  c.prompt.num_virtual_tokens = 5;
  set.add("p", c);
  const std::string site = set.sites("p").at(0);
  const std::vector<int64_t> prompt_ids = {11, 12, 13, 14, 15};
  {
    torch::NoGradGuard g;
    set.tensors("p")
        .at(site + ".prompt_embeddings")
        .copy_(set.model()->token_embeddings().index_select(0, at::tensor(prompt_ids)));
  }
  torch::NoGradGuard g;
  at::Tensor ids = at::arange(20, 27, at::kLong).view({1, -1});  // (1, 7)
  ModelInput in;
  in.input_ids = ids;
  at::Tensor with_prompt = set.model()->forward(in);
  set.set_active("p", false);
  ModelInput typed;
  typed.input_ids = at::cat({at::tensor(prompt_ids).view({1, -1}), ids}, 1);
  at::Tensor reference = set.model()->forward(typed);
  if (arch == "bert") {
    // The classifier reads one position, so compare what every real token sees: the hidden states.
    EXPECT_EQ(with_prompt.sizes(), (std::vector<int64_t>{1, 2}));
    at::Tensor typed_hidden = set.model()->hidden_states(typed);  // prompt inactive: the tokens typed
    set.set_active("p", true);
    at::Tensor prompted_hidden = set.model()->hidden_states(in);  // (1, 7, C), virtual tokens dropped
    ASSERT_EQ(prompted_hidden.sizes(), (std::vector<int64_t>{1, 7, set.model()->config().hidden_size}));
    EXPECT_LE((prompted_hidden - typed_hidden.narrow(1, 5, 7)).abs().max().item<double>(), 1e-5);
    return;
  }
  ASSERT_EQ(with_prompt.sizes(), (std::vector<int64_t>{1, 7, set.model()->config().vocab_size}));
  EXPECT_LE((with_prompt - reference.narrow(1, 5, 7)).abs().max().item<double>(), 1e-5);
  // A mask of ones that does not mention the prompt gives the same result.
  set.set_active("p", true);
  in.attention_mask = at::ones({1, 7}, at::kLong);
  EXPECT_LE((set.model()->forward(in) - with_prompt).abs().max().item<double>(), 1e-6);
}

INSTANTIATE_TEST_SUITE_P(Archs, Prompt, ::testing::Values("gpt2", "llama", "bert"));

// Input aggregation: two prompt modules concatenate in attachment order, as if their tokens were typed.
TEST(PromptTuning, SeveralPromptsConcatenate) {
  ModuleSet set(load_model(test::tiny_checkpoint("llama")));
  const std::vector<std::vector<int64_t>> tokens = {{11, 12, 13}, {14, 15}};
  for (size_t i = 0; i < tokens.size(); ++i) {
    ModuleConfig c;
    c.type = "prompt";
    c.prompt.num_virtual_tokens = static_cast<int64_t>(tokens[i].size());
    const std::string name = "p" + std::to_string(i);
    set.add(name, c);
    torch::NoGradGuard g;
    set.tensors(name)
        .at(set.sites(name).at(0) + ".prompt_embeddings")
        .copy_(set.model()->token_embeddings().index_select(0, at::tensor(tokens[i])));
  }
  torch::NoGradGuard g;
  ModelInput in;
  in.input_ids = at::arange(20, 26, at::kLong).view({1, -1});
  at::Tensor both = set.model()->forward(in);
  set.set_active("p0", false), set.set_active("p1", false);
  ModelInput typed;
  typed.input_ids = at::cat({at::tensor({11, 12, 13, 14, 15}, at::kLong).view({1, -1}), in.input_ids}, 1);
  EXPECT_LE((both - set.model()->forward(typed).narrow(1, 5, 6)).abs().max().item<double>(), 1e-5);
}

TEST(PromptTuning, CachedGenerationTrainingAndFiles) {
  const std::string dir = test::tiny_checkpoint("llama");
  ModuleSet set(load_model(dir));
  ModuleConfig c;
  c.type = "prompt";
  c.prompt.num_virtual_tokens = 4;
  c.prompt.init = "random";
  set.add("p", c);
  set.freeze_base({"p"});
  EXPECT_EQ(set.summary().trainable, 4 * set.model()->config().hidden_size);
  GenerateOptions o;
  o.max_tokens = 10;
  o.stop_token_ids = {-1};
  auto cached = generate(*set.model(), {5, 6, 7}, o);
  o.use_cache = false;
  EXPECT_EQ(generate(*set.model(), {5, 6, 7}, o).tokens, cached.tokens);

  ModelInput in;
  in.input_ids = at::arange(3, 15, at::kLong).view({2, 6});
  at::Tensor before = set.tensors("p").begin()->second.detach().clone();
  torch::optim::SGD opt(set.parameters({"p"}), torch::optim::SGDOptions(0.5));
  set.model()->forward(in).pow(2).mean().backward();
  opt.step();
  EXPECT_FALSE(at::equal(before, set.tensors("p").begin()->second));
  for (const auto& p : set.model()->parameters()) EXPECT_FALSE(p.grad().defined());

  test::TempDir tmp;
  set.save("p", tmp / "native");
  write_peft(set, "p", tmp / "peft");
  auto cfg = nlohmann::json::parse(io::read_text(tmp / "peft/adapter_config.json"));
  EXPECT_EQ(cfg["peft_type"], "PROMPT_TUNING");
  EXPECT_EQ(cfg["num_virtual_tokens"], 4);
  torch::NoGradGuard g;
  at::Tensor want = set.model()->forward(in);
  for (const std::string sub : {"native", "peft"}) {
    ModuleSet other(load_model(dir));
    other.load(tmp / sub, "p");
    EXPECT_TRUE(at::equal(other.model()->forward(in), want)) << sub;
  }
  ModuleSet gpt(load_model(test::tiny_checkpoint("gpt2")));
  io::save_safetensors(tmp / "peft/adapter_model.safetensors", {{"prompt_embeddings", at::zeros({4, 99})}});
  EXPECT_THROW_WITH(gpt.load(tmp / "peft"), "prompt_embeddings has shape [4, 99]", "another base model");
}

}  // namespace
}  // namespace mdl
