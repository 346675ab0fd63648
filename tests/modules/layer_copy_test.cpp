// Whole layers trained with a module (modules_to_save, modules/layer_copy): the copy computes the projection
// with its own weights, composes with other modules, merges and unmerges exactly; ModuleSet adds, saves
// and reads it in the native and PEFT formats (PEFT's names: "<module>.weight" and modules_to_save in the
// config), refuses it in AdapterHub's and refuses names that match no projection; the trainer's default
// adds a head the checkpoint lacked; merging averages the heads as task vectors; labels and rank patterns
// travel in PEFT's files.
#include "mdl/modules/layer_copy.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/utils.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "backbones/fixtures.h"
#include "mdl/aggregation/merge.h"
#include "mdl/io/safetensors.h"
#include "mdl/modules/module_set.h"
#include "mdl/training/train_config.h"
#include "test_util.h"

namespace fs = std::filesystem;

namespace mdl {
namespace {

/// A copy of the tiny causal Llama whose config.json asks for sequence classification: its checkpoint has
/// no `score`, so the loader initialises one (what a user does to classify with a causal base).
std::string headless_classifier(const test::TempDir& tmp) {
  const fs::path dir = tmp / "headless";
  fs::create_directories(dir);
  for (const auto& e : fs::directory_iterator(test::tiny_checkpoint("llama")))
    fs::copy(e.path(), dir / e.path().filename());
  auto config = nlohmann::json::parse(test::read_file(dir / "config.json"));
  config["architectures"] = {"LlamaForSequenceClassification"};
  config["num_labels"] = 3;
  test::write_file(dir / "config.json", config.dump());
  return dir.string();
}

ModuleConfig lora_with_head() {
  ModuleConfig c;
  c.type = "lora";
  c.lora.r = 4;
  c.lora.init = "gaussian";  // B non-zero too: the LoRA changes the outputs from the start
  c.modules_to_save = {"score"};
  c.labels = {"a", "b", "c"};
  return c;
}

ModelInput tokens(const Model& m, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  ModelInput in;
  in.input_ids = at::randint(5, m->config().vocab_size, {2, 7}, gen, at::kLong);
  return in;
}

/// Gives module `name`'s copy of `score` new values.
void change_head(ModuleSet& set, const std::string& name, uint64_t seed) {
  torch::NoGradGuard g;
  at::manual_seed(seed);
  at::Tensor w = set.tensors(name).at("score.weight");
  w.add_(at::randn_like(w) * 0.5);
}

TEST(LayerCopy, ComputesTheProjectionWithItsOwnWeightsAndMergesExactly) {
  Model m = load_model(test::tiny_checkpoint("llama", "sequence_classification"));
  torch::NoGradGuard g;
  const ModelInput in = tokens(m, 1);
  const at::Tensor bare = m->forward(in);
  ModuleSet set(m);
  set.add("head", lora_with_head());
  const auto sites = set.sites("head");
  EXPECT_EQ(sites.back(), "score");
  EXPECT_EQ(set.module_at("head", "score")->type(), "modules_to_save");
  ASSERT_TRUE(set.tensors("head").count("score.weight"));
  EXPECT_TRUE(at::equal(set.tensors("head").at("score.weight"), m->linear("score").weight))
      << "the copy starts as the base layer";
  set.set_active("head", false);
  change_head(set, "head", 2);
  EXPECT_CLOSE(m->forward(in), bare, 1e-6);
  set.set_active("head", true);
  const at::Tensor with = m->forward(in);
  // The reference: the LoRA alone, then the head replaced by the copy's weights by hand.
  const at::Tensor copy = set.tensors("head").at("score.weight").clone();
  const at::Tensor base_score = m->linear("score").weight.clone();
  m->linear("score").weight.copy_(copy);
  set.set_active("head", false);
  ModuleConfig lora_only = lora_with_head();
  lora_only.modules_to_save.clear();
  set.add("lora", lora_only);
  set.load_tensors(
      "lora",
      [&] {
        auto t = set.tensors("head");
        t.erase("score.weight");
        return t;
      }(),
      "the head module's LoRA");
  EXPECT_CLOSE(with, m->forward(in), 1e-5) << "the copy composes with the LoRA at other sites";
  set.remove("lora");
  m->linear("score").weight.copy_(base_score);
  set.set_active("head", true);
  // Merging writes the copy into the base layer; unmerging restores it bit for bit.
  set.merge("head");
  EXPECT_TRUE(at::equal(m->linear("score").weight, copy));
  EXPECT_CLOSE(m->forward(in), with, 1e-5);
  set.unmerge("head");
  EXPECT_TRUE(at::equal(m->linear("score").weight, base_score));
  // Trainable with the module, the backbone frozen.
  set.freeze_base({"head"});
  EXPECT_TRUE(set.tensors("head").at("score.weight").requires_grad());
  EXPECT_FALSE(m->linear("score").weight.requires_grad());
}

TEST(LayerCopy, NamesThatMatchNoProjectionAreRefused) {
  Model m = load_model(test::tiny_checkpoint("llama", "sequence_classification"));
  ModuleSet set(m);
  ModuleConfig c = lora_with_head();
  c.modules_to_save = {"classifier"};
  EXPECT_THROW_WITH(
      set.add("x", c),
      "modules_to_save names 'classifier', which is no projection of LlamaForSequenceClassification;"
      " its projections outside the blocks are: score");
  EXPECT_FALSE(set.contains("x"));
}

TEST(LayerCopy, SavedAndReadInNativeAndPeftRefusedInAdapterHub) {
  test::TempDir tmp;
  Model m = load_model(test::tiny_checkpoint("llama", "sequence_classification"));
  const ModelInput in = tokens(m, 3);
  ModuleSet set(m);
  ModuleConfig c = lora_with_head();
  c.lora.rank_pattern = {{"q_proj", 4}, {"v_proj", 2}};  // q_proj's equals r: PEFT lists only v_proj
  set.add("head", c);
  change_head(set, "head", 4);
  at::Tensor want;
  {
    torch::NoGradGuard g;
    want = m->forward(in);
  }
  set.save("head", tmp / "native");
  set.save("head", tmp / "peft", "peft");
  EXPECT_THROW_WITH(set.save("head", tmp / "hub", "adapterhub"),
                    "AdapterHub carries heads as its own prediction-head modules");
  EXPECT_FALSE(fs::exists(tmp / "hub"));

  const auto pj = nlohmann::json::parse(test::read_file(tmp / "peft/adapter_config.json"));
  EXPECT_EQ(pj["modules_to_save"], nlohmann::json({"score"}));
  EXPECT_EQ(pj["target_modules"], nlohmann::json({"q_proj", "v_proj"})) << "a list where names are exact";
  EXPECT_EQ(pj["rank_pattern"], nlohmann::json({{"v_proj", 2}})) << "only the ranks that differ from r";
  EXPECT_EQ(pj["task_type"], "SEQ_CLS");
  const io::SafetensorsFile weights(tmp / "peft/adapter_model.safetensors");
  EXPECT_TRUE(weights.contains("base_model.model.score.weight")) << "PEFT's name for a saved layer";
  EXPECT_EQ(weights.metadata().at("mdl.labels"), "[\"a\",\"b\",\"c\"]");

  // PEFT writes ["classifier", "score"] for every sequence-classification model; the names without a layer
  // in the file are dropped on reading.
  {
    auto edited = nlohmann::json::parse(test::read_file(tmp / "peft/adapter_config.json"));
    edited["modules_to_save"] = {"classifier", "score"};
    test::write_file(tmp / "peft/adapter_config.json", edited.dump());
  }
  for (const char* dir : {"native", "peft"}) {
    Model fresh = load_model(test::tiny_checkpoint("llama", "sequence_classification"));
    ModuleSet back(fresh);
    const std::string name = back.load(tmp / dir);
    EXPECT_EQ(back.config(name).modules_to_save, nlohmann::json({"score"}).get<std::vector<std::string>>())
        << dir;
    EXPECT_EQ(back.config(name).labels, c.labels) << dir;
    for (const auto& [k, t] : set.tensors("head"))
      EXPECT_TRUE(at::equal(back.tensors(name).at(k), t)) << dir << " " << k;
    torch::NoGradGuard g;
    EXPECT_CLOSE(fresh->forward(in), want, 1e-5) << dir;
  }
}

TEST(LayerCopy, ANewHeadIsTrainedWithTheModuleByDefault) {
  test::TempDir tmp;
  Model m = load_model(headless_classifier(tmp));
  EXPECT_EQ(m->initialised_parameters(), std::vector<std::string>{"score.weight"});
  ModuleConfig plain;
  plain.type = "lora";
  EXPECT_EQ(with_new_heads(plain, *m).modules_to_save, std::vector<std::string>{"score"});
  ModuleConfig given = plain;
  given.modules_to_save = {"score"};
  EXPECT_EQ(with_new_heads(given, *m).modules_to_save, given.modules_to_save);
  Model whole = load_model(test::tiny_checkpoint("llama", "sequence_classification"));
  EXPECT_TRUE(with_new_heads(plain, *whole).modules_to_save.empty()) << "a head on disk stays the base's";
}

TEST(LayerCopy, MergedModulesAverageTheirHeadsAsTaskVectors) {
  test::TempDir tmp;
  const std::string base = test::tiny_checkpoint("llama", "sequence_classification");
  Model m = load_model(base);
  ModuleSet set(m);
  for (const char* name : {"one", "two"}) {
    set.add(name, lora_with_head());
    change_head(set, name, name[0]);
    set.save(name, tmp / name);
  }
  MergeOptions o;  // linear, equal weights
  merge_modules(base, {tmp / "one", tmp / "two"}, o, tmp / "merged");
  Model fresh = load_model(base);
  ModuleSet back(fresh);
  back.load(tmp / "merged", "merged");
  EXPECT_EQ(back.config("merged").modules_to_save, std::vector<std::string>{"score"});
  EXPECT_EQ(back.config("merged").labels, lora_with_head().labels);
  const at::Tensor want = (set.tensors("one").at("score.weight") + set.tensors("two").at("score.weight")) / 2;
  EXPECT_CLOSE(back.tensors("merged").at("score.weight"), want, 1e-6);
  // Modules with other heads do not merge.
  ModuleConfig no_head = lora_with_head();
  no_head.modules_to_save.clear();
  set.add("three", no_head);
  set.save("three", tmp / "three");
  EXPECT_THROW_WITH(merge_modules(base, {tmp / "one", tmp / "three"}, o, tmp / "bad"),
                    "trains other whole layers (modules_to_save) than");
}

}  // namespace
}  // namespace mdl
