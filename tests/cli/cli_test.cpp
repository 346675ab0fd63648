// Drives the real `mdl` binary (path in $MDL_BIN, set by CTest) as a user would.
#include <ATen/ATen.h>
#include <signal.h>
#include <sys/wait.h>
#include <torch/utils.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "cli/cli_util.h"
#include "mdl/backbones/generate.h"
#include "mdl/backbones/model.h"
#include "mdl/io/safetensors.h"
#include "mdl/modules/module_set.h"
#include "mdl/modules/module_type.h"
#include "mdl/tokenizers/tokenizer.h"
#include "modules/module_fixtures.h"
#include "test_util.h"

namespace mdl {
namespace {

using test::mdl;
using test::quote;
using test::Result;
namespace fs = std::filesystem;

class Cli : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir();
    for (const std::string arch : {"gpt2", "llama", "bert"}) {
      Result r = mdl("init-model --arch " + arch + " --preset tiny --seed 3 --out " + quote(*dir_ / arch));
      ASSERT_EQ(r.code, 0) << r.err;
      EXPECT_NE(r.out.find("created"), std::string::npos);
    }
  }
  static void TearDownTestSuite() { delete dir_; }
  static std::string model(const std::string& arch) { return *dir_ / arch; }
  static test::TempDir* dir_;
};
test::TempDir* Cli::dir_ = nullptr;

TEST_F(Cli, InitModelWritesTheHuggingFaceLayout) {
  for (const std::string arch : {"gpt2", "llama", "bert"})
    for (const char* f : {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"})
      EXPECT_TRUE(std::filesystem::exists(model(arch) + "/" + f)) << arch << " " << f;
  auto config = nlohmann::json::parse(test::read_file(model("llama") + "/config.json"));
  EXPECT_EQ(config["architectures"][0], "LlamaForCausalLM");
  EXPECT_EQ(config["model_type"], "llama");
  // Same seed, same bytes.
  test::TempDir again;
  ASSERT_EQ(mdl("init-model --arch llama --preset tiny --seed 3 --out " + quote(again / "m")).code, 0);
  EXPECT_EQ(test::read_file(again / "m/model.safetensors"),
            test::read_file(model("llama") + "/model.safetensors"));
}

// --modules 'stack(a, b)' applies a, then b on its output: the logits of a set that loaded them in that
// order; the other order gives other logits.
TEST_F(Cli, StackAppliesModulesInTheWrittenOrder) {
  test::TempDir dir;
  test::save_random_adapters(model("llama"), dir.path(), {"a", "b"}, 31);
  auto cli = [&](const std::string& expr) {
    const Result r =
        mdl("forward --model " + quote(model("llama")) + " --ids 5,6,7,8 --modules-dir " + quote(dir.path()) +
            " --modules " + quote(expr) + " --out " + quote(dir / "o.safetensors"));
    EXPECT_EQ(r.code, 0) << r.err;
    return io::load_safetensors(dir / "o.safetensors").at("logits").clone();
  };
  auto library = [&](const std::vector<std::string>& order) {
    ModuleSet set(load_model(model("llama")));
    for (const auto& n : order) set.load(dir / n);
    torch::NoGradGuard g;
    ModelInput in;
    in.input_ids = at::tensor(std::vector<int64_t>{5, 6, 7, 8}).view({1, -1});
    return set.model()->forward(in)[0];
  };
  const at::Tensor ab = cli("stack(a, b)"), ba = cli("stack(b, a)");
  EXPECT_CHANGED(ab, ba);
  EXPECT_CLOSE(ab, library({"a", "b"}), 1e-5);
  EXPECT_CLOSE(ba, library({"b", "a"}), 1e-5);
  EXPECT_CLOSE(cli("b,a"), ba, 1e-6) << "a list is a stack in its order";
}

TEST_F(Cli, InspectListsTensors) {
  Result r = mdl("inspect " + quote(model("gpt2")));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("GPT2LMHeadModel"), std::string::npos);
  EXPECT_NE(r.out.find("transformer.h.0.attn.c_attn.weight  F32    [64, 192]"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("28 tensors in 1 file(s)"), std::string::npos) << r.out;
}

TEST_F(Cli, TokenizeMatchesTheLibrary) {
  const std::string text = "Hello, modular world!";
  Result r = mdl("tokenize --model " + quote(model("llama")) + " --text " + quote(text));
  ASSERT_EQ(r.code, 0) << r.err;
  auto ids = nlohmann::json::parse(r.out).get<std::vector<int64_t>>();
  EXPECT_EQ(ids, Tokenizer::from_file(model("llama")).encode(text));
  EXPECT_EQ(ids.front(), 1);  // <s>
}

TEST_F(Cli, ForwardWritesTheLogitsOfTheLibrary) {
  test::TempDir out;
  Result r =
      mdl("forward --model " + quote(model("gpt2")) + " --ids 5,6,7,8 --out " + quote(out / "l.safetensors"));
  ASSERT_EQ(r.code, 0) << r.err;
  at::Tensor logits = io::load_safetensors(out / "l.safetensors").at("logits");
  Model m = load_model(model("gpt2"));
  torch::NoGradGuard g;
  ModelInput in;
  in.input_ids = at::tensor(std::vector<int64_t>{5, 6, 7, 8}).view({1, -1});
  EXPECT_TRUE(at::allclose(logits, m->forward(in)[0]));
  EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{4, m->config().vocab_size}));
  r = mdl("forward --model " + quote(model("bert")) + " --text 'a test' --out " +
          quote(out / "b.safetensors"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(io::load_safetensors(out / "b.safetensors").at("logits").sizes(), (std::vector<int64_t>{2}));
}

TEST_F(Cli, GenerateIsDeterministicAndMatchesTheLibrary) {
  const std::string args =
      "generate --model " + quote(model("llama")) + " --prompt 'The quick' --max-tokens 10";
  Result a = mdl(args + " --temperature 0.9 --seed 4"), b = mdl(args + " --temperature 0.9 --seed 4");
  ASSERT_EQ(a.code, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
  EXPECT_EQ(a.out.rfind("The quick", 0), 0u);
  EXPECT_NE(a.err.find("tokens/s"), std::string::npos);
  Result greedy = mdl(args);
  Tokenizer tok = Tokenizer::from_file(model("llama"));
  Model m = load_model(model("llama"));
  GenerateOptions o;
  o.max_tokens = 10;
  auto r = generate(*m, tok.encode("The quick"), o);
  std::vector<int64_t> visible = r.tokens;
  if (r.finish_reason == "stop") visible.pop_back();
  EXPECT_EQ(greedy.out, "The quick" + tok.decode(visible) + "\n");
}

TEST_F(Cli, ErrorsAreOneLineAndNonZero) {
  Result r = mdl("forward --model /nonexistent --ids 1 --out /tmp/x.safetensors");
  EXPECT_NE(r.code, 0);
  EXPECT_EQ(r.err.rfind("mdl: error: ", 0), 0u) << r.err;
  EXPECT_NE(r.err.find("/nonexistent"), std::string::npos);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  r = mdl("generate --model " + quote(model("gpt2")) + " --prompt hi --top-p 0");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("top_p must be in (0, 1]"), std::string::npos) << r.err;
  r = mdl("forward --model " + quote(model("gpt2")) + " --ids 1,x --out /tmp/x.safetensors");
  EXPECT_NE(r.err.find("'x' is not an integer"), std::string::npos) << r.err;
  r = mdl("generate --model " + quote(model("bert")) + " --prompt hi");
  EXPECT_NE(r.err.find("no causal LM head"), std::string::npos) << r.err;
  r = mdl("forward --model " + quote(model("gpt2")) + " --ids 1,99999 --out /tmp/x.safetensors");
  EXPECT_NE(r.err.find("token ids must be in [0, 384)"), std::string::npos) << r.err;
  r = mdl("forward --model " + quote(model("gpt2")) + " --ids 1 --out /tmp/x.safetensors --device cuda");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("cuda"), std::string::npos) << r.err;
  r = mdl("init-model --arch t5 --out /tmp/nope");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("t5"), std::string::npos) << r.err;
  EXPECT_NE(mdl("frobnicate").code, 0);
}

TEST_F(Cli, ModulesOnForwardInspectAndMergeIntoBase) {
  test::TempDir out;
  const std::string cfg =
      R"('{"type":"lora","options":{"init_lora_weights":false,"r":4},"targets":{"target_modules":"all-linear"}}')";
  Result r = mdl("init-module --model " + quote(model("llama")) + " --config " + cfg + " --out " +
                 quote(out / "lora1"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("trainable params:"), std::string::npos) << r.out;
  r = mdl("init-module --model " + quote(model("llama")) + " --type ia3 --format peft --out " +
          quote(out / "ia3peft"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(std::filesystem::exists(out / "ia3peft/adapter_config.json"));

  r = mdl("inspect " + quote(out / "lora1"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("type lora"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("rank: 4 (14 sites)"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("base: LlamaForCausalLM"), std::string::npos) << r.out;
  r = mdl("inspect " + quote(out / "ia3peft"));
  EXPECT_NE(r.out.find("peft_type IA3"), std::string::npos) << r.out;
  // mdl's own AdapterHub files (adapter.safetensors, not PEFT's adapter_model.safetensors) inspect too.
  for (const char* type : {"adapter", "lora"}) {
    const std::string dir = out / (std::string("hub-") + type);
    r = mdl("init-module --model " + quote(model("llama")) + " --type " + type +
            " --format adapterhub --out " + quote(dir));
    ASSERT_EQ(r.code, 0) << r.err;
    ASSERT_TRUE(std::filesystem::exists(dir + "/adapter.safetensors")) << type;
    r = mdl("inspect " + quote(dir));
    ASSERT_EQ(r.code, 0) << type << ": " << r.err;
    EXPECT_NE(r.out.find("(AdapterHub)"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find(" sites, "), std::string::npos) << r.out;
  }

  auto run_forward = [&](const std::string& extra, const std::string& file,
                         const std::string& which = "llama") {
    Result f = mdl("forward --model " + quote(model(which)) + " --ids 5,6,7,8 --out " + quote(out / file) +
                   " " + extra);
    EXPECT_EQ(f.code, 0) << f.err;
    return io::load_safetensors(out / file).at("logits").clone();
  };
  at::Tensor base = run_forward("", "base.safetensors");
  at::Tensor with = run_forward("--modules " + quote(out / "lora1"), "with.safetensors");
  at::Tensor zero = run_forward("--modules " + quote(out / "lora1") + ":0", "zero.safetensors");
  at::Tensor both =
      run_forward("--modules " + quote(out / "lora1") + "," + quote(out / "ia3peft"), "both.safetensors");
  EXPECT_CHANGED(with, base);
  EXPECT_CLOSE(zero, base, 1e-6);
  EXPECT_TRUE(at::allclose(both, with, 1e-5, 1e-5));  // (IA)^3 starts at ones
  {
    ModuleSet set(load_model(model("llama")));
    set.load(out / "lora1");
    torch::NoGradGuard g;
    ModelInput in;
    in.input_ids = at::tensor(std::vector<int64_t>{5, 6, 7, 8}).view({1, -1});
    EXPECT_TRUE(at::allclose(with, set.model()->forward(in)[0]));
  }
  r = mdl("merge-into-base --model " + quote(model("llama")) + " --modules " + quote(out / "lora1") +
          " --out " + quote(out / "merged"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(std::filesystem::exists(out / "merged/tokenizer.json"));
  r = mdl("forward --model " + quote(out / "merged") + " --ids 5,6,7,8 --out " +
          quote(out / "m.safetensors"));
  ASSERT_EQ(r.code, 0) << r.err;
  at::Tensor merged = io::load_safetensors(out / "m.safetensors").at("logits");
  EXPECT_LE((merged - with).abs().max().item<double>(),
            1e-5 * std::max(1.0, with.abs().max().item<double>()));

  r = mdl("generate --model " + quote(model("llama")) + " --prompt hi --max-tokens 4 --modules " +
          quote(out / "lora1"));
  EXPECT_EQ(r.code, 0) << r.err;
  r = mdl("forward --model " + quote(model("gpt2")) + " --ids 1 --out /tmp/x.safetensors --modules " +
          quote(out / "lora1"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("another base model"), std::string::npos) << r.err;
  r = mdl("forward --model " + quote(model("gpt2")) +
          " --ids 1 --out /tmp/x.safetensors --modules /nonexistent/mod");
  EXPECT_NE(r.err.find("/nonexistent/mod"), std::string::npos) << r.err;
}

TEST_F(Cli, MixtureOfExpertsCommands) {
  test::TempDir tmp;
  Result r = mdl("init-model --arch mixtral --preset tiny --out " + quote(tmp / "mixtral"));
  ASSERT_EQ(r.code, 0) << r.err;
  auto config = nlohmann::json::parse(test::read_file(tmp / "mixtral/config.json"));
  EXPECT_EQ(config["architectures"][0], "MixtralForCausalLM");
  EXPECT_EQ(config["num_local_experts"], 8);
  EXPECT_EQ(config["num_experts_per_tok"], 2);
  r = mdl("forward --model " + quote(tmp / "mixtral") + " --text 'the cat' --out " +
          quote(tmp / "l.safetensors") +
          " --routing-stats --router '{\"kind\":\"switch\",\"capacity_factor\":1.0}'");
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("model.layers.1.block_sparse_moe"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("dropped"), std::string::npos) << r.out;
  r = mdl("upcycle --model " + quote(model("llama")) + " --experts 4 --top-k 2 --out " + quote(tmp / "up"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(std::filesystem::exists(tmp / "up/tokenizer.json"));
  // Identical experts, normalised top-2: the dense model's logits.
  ASSERT_EQ(
      mdl("forward --model " + quote(model("llama")) + " --ids 5,6,7 --out " + quote(tmp / "a.safetensors"))
          .code,
      0);
  ASSERT_EQ(
      mdl("forward --model " + quote(tmp / "up") + " --ids 5,6,7 --out " + quote(tmp / "b.safetensors")).code,
      0);
  auto a = io::load_safetensors(tmp / "a.safetensors").at("logits"),
       b = io::load_safetensors(tmp / "b.safetensors").at("logits");
  EXPECT_TRUE(at::allclose(a, b, 1e-4, 1e-4));
  r = mdl("moefy --model " + quote(model("llama")) + " --experts 4 --top-k 2 --method activations --out " +
          quote(tmp / "mf"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("layer 1: top-2 keeps"), std::string::npos) << r.out;
  r = mdl("upcycle --model " + quote(model("gpt2")) + " --out " + quote(tmp / "x"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("needs a dense Llama-family model"), std::string::npos) << r.err;
  r = mdl("forward --model " + quote(model("llama")) + " --ids 1 --out " + quote(tmp / "c.safetensors") +
          " --router '{\"kind\":\"hash\"}'");
  EXPECT_NE(r.err.find("is dense"), std::string::npos) << r.err;
}

// ModuleFormer's life after training: experts added, only they trained on new text (the old ones stay
// bit-identical), then pruned to the most used on some text; each step a checkpoint in IBM's layout.
TEST_F(Cli, ModuleFormerExpertsAddTrainPrune) {
  test::TempDir tmp;
  Result r = mdl("init-model --arch moduleformer --out " + quote(tmp / "mf"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("ModuleFormerForCausalLM"), std::string::npos) << r.out;
  r = mdl("experts add --model " + quote(tmp / "mf") + " --attention 2 --mlp 4 --out " +
          quote(tmp / "grown"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("8 -> 10 attention and 8 -> 12 MLP experts"), std::string::npos) << r.out;
  auto config = nlohmann::json::parse(test::read_file(tmp / "grown/config.json"));
  EXPECT_EQ(config["n_mlp_experts"], 12);
  EXPECT_EQ(config["mdl_frozen_experts"]["mlp"], 8);
  EXPECT_TRUE(std::filesystem::exists(tmp / "grown/tokenizer.json"));
  std::string lines;
  for (const char* s : {"the cat sat on the mat", "a dog ran in the park", "my bird sings at dawn"})
    lines += std::string("{\"text\": \"") + s + "\"}\n";
  test::write_file(tmp / "text.jsonl", lines);
  nlohmann::json run = {{"model", tmp / "grown"},
                        {"train_data", tmp / "text.jsonl"},
                        {"data", {{"kind", "text"}}},
                        {"options",
                         {{"steps", 3},
                          {"batch_size", 3},
                          {"train_base", true},
                          {"freeze_old_experts", true},
                          {"out_dir", tmp / "run"},
                          {"schedule", {{"lr", 0.01}}}}}};
  test::write_file(tmp / "run.json", run.dump());
  r = mdl("train --config " + quote(tmp / "run.json"));
  ASSERT_EQ(r.code, 0) << r.err;
  auto grown = io::load_safetensors(tmp / "grown/model.safetensors"),
       trained = io::load_safetensors(tmp / "run/model/model.safetensors");
  const std::string w = "transformer.h.0.mlpf.experts.weight";
  EXPECT_TRUE(at::equal(trained.at(w).narrow(0, 0, 8), grown.at(w).narrow(0, 0, 8)));
  EXPECT_FALSE(at::equal(trained.at(w).narrow(0, 8, 4), grown.at(w).narrow(0, 8, 4)));
  EXPECT_TRUE(at::equal(trained.at("transformer.h.0.attn.k_proj.weight"),
                        grown.at("transformer.h.0.attn.k_proj.weight")));
  r = mdl("experts prune --model " + quote(tmp / "run/model") + " --data " + quote(tmp / "text.jsonl") +
          " --keep 4 --keep-attention 6 --out " + quote(tmp / "pruned"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("layer 1 MLP experts' use (* kept):"), std::string::npos) << r.out;
  config = nlohmann::json::parse(test::read_file(tmp / "pruned/config.json"));
  EXPECT_EQ(config["n_mlp_experts"], 4);
  EXPECT_EQ(config["n_att_experts"], 6);
  EXPECT_LT(std::filesystem::file_size(tmp / "pruned/model.safetensors"),
            std::filesystem::file_size(tmp / "run/model/model.safetensors"));
  r = mdl("generate --model " + quote(tmp / "pruned") + " --prompt 'the cat' --max-tokens 4");
  ASSERT_EQ(r.code, 0) << r.err;
  // Refusals name what is wrong.
  r = mdl("experts add --model " + quote(model("llama")) + " --mlp 2 --out " + quote(tmp / "x"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("experts are added to and pruned from ModuleFormer models"), std::string::npos)
      << r.err;
  r = mdl("experts prune --model " + quote(tmp / "mf") + " --data " + quote(tmp / "text.jsonl") +
          " --keep 20 --out " + quote(tmp / "y"));
  EXPECT_NE(r.err.find("--keep 20 must be in 1..8"), std::string::npos) << r.err;
}

// Specialisation metrics from saved routing, and from a routed model over data labelled by task.
TEST_F(Cli, AnalyzeRoutingFromProbabilitiesAndFromAModel) {
  test::TempDir tmp;
  const at::Tensor probs = at::eye(3).repeat({2, 1}), rules = at::arange(3, at::kLong).repeat({2});
  io::save_safetensors(tmp / "routing.safetensors", {{"probs", probs}, {"rules", rules}});
  Result r = mdl("analyze-routing --probs " + quote(tmp / "routing.safetensors"));
  ASSERT_EQ(r.code, 0) << r.err;
  auto j = nlohmann::json::parse(r.out);
  for (const char* k : {"collapse_avg", "collapse_worst", "inverse_mi", "alignment", "adaptation"})
    EXPECT_NEAR(j[k].get<double>(), 0.0, 1e-6) << k;
  EXPECT_NEAR(j["random"]["alignment"].get<double>(), 2.0 / 3, 1e-9);
  io::save_safetensors(tmp / "bad.safetensors", {{"probs", probs}});
  r = mdl("analyze-routing --probs " + quote(tmp / "bad.safetensors"));
  EXPECT_NE(r.err.find("has no tensor 'rules'"), std::string::npos) << r.err;

  ASSERT_EQ(mdl("init-model --arch mixtral --out " + quote(tmp / "mixtral")).code, 0);
  std::string lines;
  for (const char* task : {"animals", "weather"})
    for (const char* s : {"the cat sat", "rain falls", "a dog ran", "the sun shines"})
      lines += std::string("{\"text\": \"") + s + "\", \"task\": \"" + task + "\"}\n";
  test::write_file(tmp / "tasks.jsonl", lines);
  r = mdl("analyze-routing --model " + quote(tmp / "mixtral") + " --data " + quote(tmp / "tasks.jsonl") +
          " --label task");
  ASSERT_EQ(r.code, 0) << r.err;
  j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["values"], nlohmann::json({"animals", "weather"}));
  ASSERT_EQ(j["sites"].size(), 2u);  // the tiny Mixtral's two expert layers
  EXPECT_EQ(j["sites"][0]["site"], "model.layers.0.block_sparse_moe");
  EXPECT_EQ(j["sites"][0]["modules"], 8);
  EXPECT_GE(j["sites"][0]["inverse_mi"].get<double>(), 0.0);
  r = mdl("analyze-routing --model " + quote(model("llama")) + " --data " + quote(tmp / "tasks.jsonl"));
  EXPECT_NE(r.err.find("nothing in this model routes"), std::string::npos) << r.err;
  r = mdl("analyze-routing --model " + quote(tmp / "mixtral") + " --data " + quote(tmp / "tasks.jsonl") +
          " --label language");
  EXPECT_NE(r.err.find("has no 'language' field"), std::string::npos) << r.err;
}

TEST_F(Cli, MergeAndCompositionExpressions) {
  test::TempDir tmp;
  for (const char* name : {"a", "b"}) {
    Result r = mdl("init-module --model " + quote(model("llama")) + " --type lora --seed " +
                   std::string(name[0] == 'a' ? "1" : "2") +
                   " --config '{\"type\":\"lora\",\"options\":{\"init_lora_weights\":false}}' --out " +
                   quote(tmp / name));
    ASSERT_EQ(r.code, 0) << r.err;
  }
  Result r = mdl("merge --method cat --inputs " + quote(tmp / "a") + " " + quote(tmp / "b") +
                 " --weights 0.5 0.5 --base " + quote(model("llama")) + " --out " + quote(tmp / "cat"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("LoRA rank 16"), std::string::npos) << r.out;
  // The merged module equals the expression a:0.5 + b:0.5 on forward.
  ASSERT_EQ(mdl("forward --model " + quote(model("llama")) + " --ids 5,6,7 --modules cat --modules-dir " +
                quote(tmp.path()) + " --out " + quote(tmp / "x.safetensors"))
                .code,
            0);
  r = mdl("forward --model " + quote(model("llama")) +
          " --ids 5,6,7 --modules 'a:0.5 + b:0.5' --modules-dir " + quote(tmp.path()) + " --out " +
          quote(tmp / "y.safetensors"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(at::allclose(io::load_safetensors(tmp / "x.safetensors").at("logits"),
                           io::load_safetensors(tmp / "y.safetensors").at("logits"), 1e-4, 1e-4));
  r = mdl("forward --model " + quote(model("llama")) + " --ids 5 --modules 'stack(a, b' --out " +
          quote(tmp / "z.safetensors"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("[compose] column 11: expected ')' to close 'stack('"), std::string::npos) << r.err;
  r = mdl("merge --method ties --inputs " + quote(model("llama")) + " " + quote(model("llama")) +
          " --density 0.5 --out " + quote(tmp / "ck"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_TRUE(std::filesystem::exists(tmp / "ck/config.json"));
  r = mdl("merge --method average --inputs " + quote(tmp / "a") + " --base " + quote(model("llama")) +
          " --out " + quote(tmp / "e"));
  EXPECT_NE(r.err.find("unknown method 'average'"), std::string::npos) << r.err;
}

TEST_F(Cli, TrainResumeAndEval) {
  test::TempDir tmp;
  ASSERT_EQ(mdl("init-model --arch llama --head sequence_classification --out " + quote(tmp / "m")).code, 0);
  std::string lines;
  for (const char* s : {"the", "a", "my", "one"})
    for (const char* animal : {"cat", "dog"})
      lines += std::string("{\"text\": \"") + s + " " + animal + "\", \"label\": \"" + animal + "\"}\n";
  test::write_file(tmp / "data.jsonl", lines);
  nlohmann::json config = {
      {"model", tmp / "m"},
      {"modules", {{"lora", {{"type", "lora"}, {"targets", {{"target_modules", "all-linear"}}}}}}},
      {"train_data", tmp / "data.jsonl"},
      {"eval_data", tmp / "data.jsonl"},
      {"options", {{"steps", 6}, {"batch_size", 4}, {"out_dir", tmp / "run"}, {"schedule", {{"lr", 0.01}}}}}};
  test::write_file(tmp / "run.json", config.dump());
  Result r = mdl("train --config " + quote(tmp / "run.json"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("step 6/6 loss"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("eval accuracy:"), std::string::npos) << r.out;
  EXPECT_TRUE(std::filesystem::exists(tmp / "run/modules/lora/module.json"));
  EXPECT_TRUE(std::filesystem::exists(tmp / "run/metrics.jsonl"));
  // More steps with the same output directory resume from its checkpoint.
  config["options"]["steps"] = 8;
  config["options"]["schedule"]["total_steps"] = 8;
  test::write_file(tmp / "run.json", config.dump());
  r = mdl("train --config " + quote(tmp / "run.json"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("at step 6"), std::string::npos) << r.out;
  r = mdl("eval --model " + quote(tmp / "m") + " --modules " + quote(tmp / "run/modules/lora") + " --data " +
          quote(tmp / "data.jsonl"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("accuracy: "), std::string::npos) << r.out;
  // The label names are saved with the module, and eval scores by them: the same examples listed with the
  // other class first score the same (indexing by first appearance in the eval file scored 1 - accuracy).
  const auto module_json = nlohmann::json::parse(test::read_file(tmp / "run/modules/lora/module.json"));
  EXPECT_EQ(module_json["config"]["labels"], nlohmann::json({"cat", "dog"}));
  std::string reversed;
  for (const char* s : {"the", "a", "my", "one"})
    for (const char* animal : {"dog", "cat"})
      reversed += std::string("{\"text\": \"") + s + " " + animal + "\", \"label\": \"" + animal + "\"}\n";
  test::write_file(tmp / "reversed.jsonl", reversed);
  const std::string accuracy = r.out.substr(r.out.find("accuracy: "), 16);
  r = mdl("eval --model " + quote(tmp / "m") + " --modules " + quote(tmp / "run/modules/lora") + " --data " +
          quote(tmp / "reversed.jsonl"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out.substr(r.out.find("accuracy: "), 16), accuracy) << r.out;
  test::write_file(tmp / "bird.jsonl", "{\"text\": \"a bird\", \"label\": \"bird\"}\n");
  r = mdl("eval --model " + quote(tmp / "m") + " --modules " + quote(tmp / "run/modules/lora") + " --data " +
          quote(tmp / "bird.jsonl"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("unknown label 'bird'"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("the modules were trained on the labels cat, dog"), std::string::npos) << r.err;
  // A bad record: the error names the file and line; --on-bad-record skip counts and goes on.
  test::write_file(tmp / "bad.jsonl", lines + "{\"text\": \"no label\"}\n");
  r = mdl("eval --model " + quote(tmp / "m") + " --data " + quote(tmp / "bad.jsonl"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("bad.jsonl:9: missing field 'label'"), std::string::npos) << r.err;
  r = mdl("eval --on-bad-record skip --model " + quote(tmp / "m") + " --data " + quote(tmp / "bad.jsonl"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("skipped 1 bad records"), std::string::npos) << r.out;
  r = mdl("train --help-config");
  EXPECT_NE(r.out.find("options.schedule.lr"), std::string::npos);
  // The data's fields per kind and every module type's options are there too.
  for (const char* text :
       {"{\"prompt\": str, \"completion\": str}", "{\"tokens\": [str], \"tags\": [str | int]}",
        "\"task\": str", "modules.<name>.options", "  lora: ", "  poly_lora: ", "num_tasks"})
    EXPECT_NE(r.out.find(text), std::string::npos) << text << "\n" << r.out;
  for (const auto& t : module_types())
    EXPECT_NE(r.out.find("  " + t.name + ": "), std::string::npos) << t.name;
  test::write_file(tmp / "bad.json", "{\"model\": 1}");
  r = mdl("train --config " + quote(tmp / "bad.json"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("bad.json"), std::string::npos) << r.err;
}

// A PEFT user's classifier on a causal base: config.json asks for a classification head the checkpoint
// lacks, so training trains and saves that head with the LoRA (modules_to_save), eval and a PEFT export use
// it, and the labels travel with it.
TEST_F(Cli, ANewHeadIsTrainedSavedAndExported) {
  test::TempDir tmp;
  const fs::path base = tmp / "classifier";
  fs::create_directories(base);
  for (const auto& e : fs::directory_iterator(model("llama"))) fs::copy(e.path(), base / e.path().filename());
  auto cfg = nlohmann::json::parse(test::read_file(base / "config.json"));
  cfg["architectures"] = {"LlamaForSequenceClassification"};
  cfg["num_labels"] = 2;
  test::write_file(base / "config.json", cfg.dump());
  std::string lines;
  for (const char* s : {"the", "a", "my", "one"})
    for (const char* animal : {"cat", "dog"})
      lines += std::string("{\"text\": \"") + s + " " + animal + "\", \"label\": \"" + animal + "\"}\n";
  test::write_file(tmp / "data.jsonl", lines);
  const nlohmann::json config = {
      {"model", base.string()},
      {"modules", {{"cls", {{"type", "lora"}}}}},
      {"train_data", tmp / "data.jsonl"},
      {"options", {{"steps", 4}, {"batch_size", 4}, {"out_dir", tmp / "run"}, {"schedule", {{"lr", 0.01}}}}}};
  test::write_file(tmp / "run.json", config.dump());
  Result r = mdl("train --config " + quote(tmp / "run.json"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("module cls trains and saves the new [\"score\"] (modules_to_save)"),
            std::string::npos)
      << r.out;
  const std::string module = tmp / "run/modules/cls";
  const auto mj = nlohmann::json::parse(test::read_file(module + "/module.json"));
  EXPECT_EQ(mj["config"]["modules_to_save"], nlohmann::json({"score"}));
  const auto trained = io::load_safetensors(module + "/module.safetensors");
  ASSERT_TRUE(trained.count("score.weight"));
  // The head trained: it moved from the loader's initialisation (seed 0, the same on every load).
  Model fresh = load_model(base.string());
  EXPECT_CHANGED(trained.at("score.weight"), fresh->linear("score").weight);
  r = mdl("eval --model " + quote(base) + " --modules " + quote(module) + " --data " +
          quote(tmp / "data.jsonl"));
  ASSERT_EQ(r.code, 0) << r.err;
  const std::string accuracy = r.out.substr(r.out.find("accuracy: "), 16);
  // Exported to PEFT and back: the same head, the same labels, the same score.
  r = mdl("convert " + quote(module) + " --model " + quote(base) + " --to peft --out " + quote(tmp / "peft"));
  ASSERT_EQ(r.code, 0) << r.err;
  const auto pj = nlohmann::json::parse(test::read_file(tmp / "peft/adapter_config.json"));
  EXPECT_EQ(pj["modules_to_save"], nlohmann::json({"score"}));
  EXPECT_EQ(pj["task_type"], "SEQ_CLS");
  EXPECT_EQ(pj["target_modules"], nlohmann::json({"q_proj", "v_proj"}));
  EXPECT_TRUE(
      io::load_safetensors(tmp / "peft/adapter_model.safetensors").count("base_model.model.score.weight"));
  r = mdl("eval --model " + quote(base) + " --modules " + quote(tmp / "peft") + " --data " +
          quote(tmp / "data.jsonl"));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_EQ(r.out.substr(r.out.find("accuracy: "), 16), accuracy) << r.out;
  r = mdl("convert " + quote(tmp / "peft") + " --model " + quote(base) + " --to native --out " +
          quote(tmp / "back"));
  ASSERT_EQ(r.code, 0) << r.err;
  const auto back = io::load_safetensors(tmp / "back/module.safetensors");
  ASSERT_EQ(back.size(), trained.size());
  for (const auto& [k, t] : trained) EXPECT_TRUE(back.count(k) && at::equal(back.at(k), t)) << k;
  EXPECT_EQ(nlohmann::json::parse(test::read_file(tmp / "back/module.json"))["config"]["labels"],
            nlohmann::json({"cat", "dog"}));
  r = mdl("convert " + quote(module) + " --model " + quote(base) + " --to adapterhub --out " +
          quote(tmp / "hub"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("export to peft or native instead"), std::string::npos) << r.err;
}

// A training process killed with SIGKILL mid-run (possibly mid-checkpoint) and started again with the
// same command ends with exactly the weights of a run that was never interrupted.
TEST_F(Cli, TrainKilledAndResumedEndsBitIdentical) {
  test::TempDir tmp;
  ASSERT_EQ(mdl("init-model --arch llama --head sequence_classification --out " + quote(tmp / "m")).code, 0);
  std::string lines;
  for (const char* s : {"the", "a", "my", "one", "her", "his"})
    for (const char* animal : {"cat", "dog"})
      for (const char* v : {"sat", "ran", "ate"})
        lines += std::string("{\"text\": \"") + s + " " + animal + " " + v + "\", \"label\": \"" + animal +
                 "\"}\n";
  test::write_file(tmp / "data.jsonl", lines);
  const int64_t steps = 400;
  auto config = [&](const std::string& out) {
    nlohmann::json c = {
        {"model", tmp / "m"},
        {"modules", {{"lora", {{"type", "lora"}, {"targets", {{"target_modules", "all-linear"}}}}}}},
        {"train_data", tmp / "data.jsonl"},
        {"options",
         {{"steps", steps},
          {"batch_size", 16},
          {"checkpoint_every", 3},
          {"out_dir", out},
          {"schedule", {{"lr", 0.01}, {"kind", "cosine"}}}}}};
    const std::string path = out + ".json";
    test::write_file(path, c.dump());
    return path;
  };
  ASSERT_EQ(mdl("train --config " + quote(config(tmp / "straight"))).code, 0);

  const std::string run = config(tmp / "run");
  std::fflush(nullptr);  // or the child's freopen writes this process's buffered output a second time
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    if (!std::freopen("/dev/null", "w", stdout) || !std::freopen("/dev/null", "w", stderr)) _exit(126);
    execl(std::getenv("MDL_BIN"), "mdl", "train", "--config", run.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  // Kill once a checkpoint past step 30 exists, at whatever point the process then is.
  int64_t seen = 0;
  test::wait_until(
      [&] {
        const std::string meta = tmp / "run/checkpoint/trainer.json";
        if (!std::filesystem::exists(meta)) return false;
        const auto j = nlohmann::json::parse(test::read_file(meta), nullptr, false);
        if (j.is_object() && j.contains("step") && j["step"].is_number_integer())
          seen = j["step"].get<int64_t>();
        return seen >= 30;
      },
      pid);
  kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status)) << "the run finished before it could be killed; give it more steps";
  ASSERT_GE(seen, 30);
  ASSERT_LT(seen, steps);

  Result r = mdl("train --config " + quote(run));
  ASSERT_EQ(r.code, 0) << r.err;
  EXPECT_NE(r.out.find("resumed from"), std::string::npos) << r.out;
  const auto a = io::load_safetensors(tmp / "straight/modules/lora/module.safetensors");
  const auto b = io::load_safetensors(tmp / "run/modules/lora/module.safetensors");
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [k, t] : a) EXPECT_TRUE(at::equal(t, b.at(k))) << k << " differs after kill and resume";
  // The metrics file is continuous: one line per step, none repeated.
  const std::string metrics = test::read_file(tmp / "run/metrics.jsonl");
  EXPECT_EQ(std::count(metrics.begin(), metrics.end(), '\n'), steps);
}

// A module moved from a 4-layer teacher to a 2-layer student (skip, avg) and to a narrower one
// (prune-align on text), in each format it was written in; the refusals name what to do.
TEST_F(Cli, TransferModuleInEachFormat) {
  test::TempDir tmp;
  for (const auto& [name, args] :
       std::vector<std::pair<std::string, std::string>>{{"teacher", "--layers 4 --seed 5"},
                                                        {"student", "--layers 2 --seed 6"},
                                                        {"narrow", "--layers 2 --hidden 48 --seed 7"}}) {
    Result r = mdl("init-model --arch llama --preset tiny " + args + " --out " + quote(tmp / name));
    ASSERT_EQ(r.code, 0) << r.err;
  }
  EXPECT_EQ(nlohmann::json::parse(test::read_file(tmp / "narrow/config.json"))["hidden_size"], 48);
  struct Case {
    std::string name, args, file;
  };
  const std::vector<Case> cases = {
      {"lora-native", "--type lora", "module.safetensors"},
      {"lora-peft", "--type lora --format peft", "adapter_model.safetensors"},
      {"lora-hub", "--type lora --format adapterhub", "adapter.safetensors"},
      {"adapter-native", "--type adapter", "module.safetensors"},
      {"adapter-hub", "--type adapter --format adapterhub", "adapter.safetensors"}};
  std::string lines;
  for (const char* t :
       {"the cat sat on the mat", "a dog ran in the park", "my bird sings at dawn", "the sun is up"})
    lines += std::string("{\"text\": \"") + t + "\"}\n";
  test::write_file(tmp / "text.jsonl", lines);
  for (const auto& c : cases) {
    Result r = mdl("init-module --model " + quote(tmp / "teacher") + " " + c.args + " --seed 3 --out " +
                   quote(tmp / c.name));
    ASSERT_EQ(r.code, 0) << r.err;
    for (const char* method : {"skip", "avg"}) {
      const std::string out = tmp / (c.name + "-" + method);
      r = mdl("transfer-module --module " + quote(tmp / c.name) + " --teacher " + quote(tmp / "teacher") +
              " --student " + quote(tmp / "student") + " --method " + method + " --out " + quote(out));
      ASSERT_EQ(r.code, 0) << c.name << " " << method << ": " << r.err;
      EXPECT_NE(r.out.find("from 4 to 2 layers"), std::string::npos) << r.out;
      EXPECT_TRUE(std::filesystem::exists(out + "/" + c.file)) << c.name << ": the input's format";
      const auto report = nlohmann::json::parse(test::read_file(out + "/transfer.json"));
      EXPECT_EQ(report["layer_map"],
                nlohmann::json::parse(method == std::string("skip") ? "[[0], [2]]" : "[[0, 1], [2, 3]]"));
      r = mdl("forward --model " + quote(tmp / "student") + " --modules " + quote(out) +
              " --ids 5,6,7 --out " + quote(tmp / "logits.safetensors"));
      EXPECT_EQ(r.code, 0) << c.name << " " << method << " on the student: " << r.err;
    }
    // prune-align onto the narrower student, measured on the text file.
    const std::string out = tmp / (c.name + "-aligned");
    r = mdl("transfer-module --module " + quote(tmp / c.name) + " --teacher " + quote(tmp / "teacher") +
            " --student " + quote(tmp / "narrow") + " --method prune-align --data " +
            quote(tmp / "text.jsonl") + " --out " + quote(out));
    ASSERT_EQ(r.code, 0) << c.name << ": " << r.err;
    EXPECT_NE(r.out.find("hidden 64 -> 48"), std::string::npos) << r.out;
    r = mdl("forward --model " + quote(tmp / "narrow") + " --modules " + quote(out) + " --ids 5,6,7 --out " +
            quote(tmp / "logits.safetensors"));
    EXPECT_EQ(r.code, 0) << c.name << " on the narrow student: " << r.err;
  }
  // The native module's layers are the teacher's 0 and 2, and it was made for the student.
  const auto teacher_t = io::load_safetensors(tmp / "lora-native/module.safetensors");
  const auto moved_t = io::load_safetensors(tmp / "lora-native-skip/module.safetensors");
  const std::string a = ".self_attn.q_proj.lora_A";
  EXPECT_TRUE(at::equal(moved_t.at("model.layers.1" + a), teacher_t.at("model.layers.2" + a)));
  const auto meta = nlohmann::json::parse(test::read_file(tmp / "lora-native-skip/module.json"));
  EXPECT_EQ(meta["base"]["n_layer"], 2);
  // Refusals.
  const std::string base =
      "transfer-module --module " + quote(tmp / "lora-native") + " --teacher " + quote(tmp / "teacher");
  Result r = mdl(base + " --student " + quote(tmp / "narrow") + " --out " + quote(tmp / "x"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("use --method prune-align with --data"), std::string::npos) << r.err;
  r = mdl(base + " --student " + quote(tmp / "narrow") + " --method prune-align --out " + quote(tmp / "x"));
  EXPECT_NE(r.err.find("give --data FILE.jsonl (text) or --images FILE"), std::string::npos) << r.err;
  r = mdl(base + " --student " + quote(tmp / "student") + " --k 4 --out " + quote(tmp / "x"));
  EXPECT_NE(r.err.find("maps student layer 1 to teacher layer 4, but the teacher has 4 layers"),
            std::string::npos)
      << r.err;
  r = mdl(base + " --student " + quote(tmp / "student") + " --out " + quote(tmp / "lora-native"));
  EXPECT_NE(r.err.find("is the input"), std::string::npos) << r.err;
  EXPECT_FALSE(std::filesystem::exists(tmp / "x")) << "a refused transfer writes nothing";
}

// mdl convert: native -> PEFT -> native and native -> AdapterHub -> native give the same tensors bit for
// bit; PEFT's file names the base checkpoint; a format the type has not is refused naming those it has.
TEST_F(Cli, ConvertRoundTripsBetweenFormats) {
  test::TempDir tmp;
  const std::string llama = model("llama");
  struct Case {
    std::string name, args, via;
  };
  for (const Case& c :
       std::vector<Case>{{"lora", "--type lora --option init_lora_weights=false", "peft"},
                         {"ia3", "--type ia3 --option init_ia3_weights=false", "peft"},
                         {"lora-hub", "--type lora --option init_lora_weights=false", "adapterhub"},
                         {"adapter", "--type adapter", "adapterhub"}}) {
    Result r =
        mdl("init-module --model " + quote(llama) + " " + c.args + " --seed 4 --out " + quote(tmp / c.name));
    ASSERT_EQ(r.code, 0) << c.name << ": " << r.err;
    r = mdl("convert " + quote(tmp / c.name) + " --model " + quote(llama) + " --to " + c.via + " --out " +
            quote(tmp / (c.name + "-" + c.via)));
    ASSERT_EQ(r.code, 0) << c.name << ": " << r.err;
    EXPECT_NE(r.out.find("(native -> " + c.via + ")"), std::string::npos) << r.out;
    r = mdl("convert " + quote(tmp / (c.name + "-" + c.via)) + " --model " + quote(llama) +
            " --to native --out " + quote(tmp / (c.name + "-back")));
    ASSERT_EQ(r.code, 0) << c.name << ": " << r.err;
    const auto before = io::load_safetensors(tmp / (c.name + "/module.safetensors"));
    const auto after = io::load_safetensors(tmp / (c.name + "-back/module.safetensors"));
    ASSERT_EQ(before.size(), after.size()) << c.name;
    for (const auto& [k, t] : before)
      EXPECT_TRUE(after.count(k) && at::equal(after.at(k), t)) << c.name << " " << k;
    // The other formats carry the type and its options, not mdl's seed or target patterns (sites become an
    // exact list), so those are what comes back.
    EXPECT_EQ(nlohmann::json::parse(test::read_file(tmp / (c.name + "/module.json")))["config"]["type"],
              nlohmann::json::parse(test::read_file(tmp / (c.name + "-back/module.json")))["config"]["type"])
        << c.name;
  }
  const auto peft = nlohmann::json::parse(test::read_file(tmp / "lora-peft/adapter_config.json"));
  EXPECT_EQ(peft["base_model_name_or_path"], llama) << "the base checkpoint, not its model type";
  EXPECT_EQ(peft["task_type"], "CAUSAL_LM");
  Result r = mdl("convert " + quote(tmp / "adapter") + " --model " + quote(llama) + " --to peft --out " +
                 quote(tmp / "x"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.err.find("is a module of type adapter, which can be written as native, adapterhub, not peft"),
            std::string::npos)
      << r.err;
}

TEST_F(Cli, EveryCommandHasHelp) {
  for (const char* cmd : {"", "init-model", "inspect", "tokenize", "forward", "generate", "init-module",
                          "merge-into-base", "upcycle", "moefy", "merge", "train", "eval", "experts add",
                          "experts prune", "analyze-routing", "transfer-module"}) {
    Result r = mdl(std::string(cmd) + " --help");
    EXPECT_EQ(r.code, 0) << cmd;
    EXPECT_NE(r.out.find("Usage"), std::string::npos) << cmd << r.out;
  }
}

// init-module's --type list is the module-type table: every type is named with its summary, the ones
// that need more than options say what, and are refused as a --type.
TEST_F(Cli, InitModuleListsEveryModuleType) {
  const Result help = mdl("init-module --help");
  ASSERT_EQ(help.code, 0) << help.err;
  for (const auto& t : module_types()) {
    EXPECT_NE(help.out.find(t.name + ": " + t.summary), std::string::npos) << t.name << "\n" << help.out;
    if (!t.needs.empty()) {
      EXPECT_NE(help.out.find("needs " + t.needs), std::string::npos) << t.name;
    }
  }
  test::TempDir out;
  const Result sparse =
      mdl("init-module --model " + quote(model("llama")) + " --type sparse --out " + quote(out / "s"));
  EXPECT_NE(sparse.code, 0);
  EXPECT_NE(sparse.err.find("--type"), std::string::npos) << sparse.err;
}

// --help-options prints the type's field list; --option KEY=VALUE sets one of its options, checked
// against that list (an unknown key names the known ones).
TEST_F(Cli, InitModuleOptionsComeFromTheTypesFieldList) {
  const Result help = mdl("init-module --type adapter --help-options");
  ASSERT_EQ(help.code, 0) << help.err;
  for (const auto& h : module_type("adapter").options_help())
    EXPECT_NE(help.out.find(h.key), std::string::npos) << h.key << "\n" << help.out;
  EXPECT_NE(help.out.find("bottleneck = hidden / reduction_factor"), std::string::npos) << help.out;
  test::TempDir out;
  const std::string base = "init-module --model " + quote(model("llama")) + " --type adapter ";
  const Result made =
      mdl(base + "--option reduction_factor=4 --option non_linearity=gelu --out " + quote(out / "a"));
  ASSERT_EQ(made.code, 0) << made.err;
  const nlohmann::json meta = nlohmann::json::parse(test::read_file(out / "a" + "/module.json"));
  EXPECT_EQ(meta["config"]["options"]["reduction_factor"], 4);
  EXPECT_EQ(meta["config"]["options"]["non_linearity"], "gelu");
  const Result unknown = mdl(base + "--option reduction=4 --out " + quote(out / "b"));
  EXPECT_NE(unknown.code, 0);
  EXPECT_NE(unknown.err.find("no option 'reduction'"), std::string::npos) << unknown.err;
  EXPECT_NE(unknown.err.find("reduction_factor"), std::string::npos) << unknown.err;
  const Result bad = mdl(base + "--option reduction_factor --out " + quote(out / "c"));
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.err.find("expected KEY=VALUE"), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace mdl
