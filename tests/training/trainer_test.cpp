// The trainer: LoRA on a frozen tiny backbone learns a task the backbone does not solve; a run stopped,
// checkpointed and resumed in a fresh trainer ends with bit-identical weights; metrics are written.
#include "mdl/training/trainer.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "backbones/fixtures.h"
#include "mdl/modules/module_set.h"
#include "mdl/tokenizers/tokenizer.h"

namespace mdl {
namespace {

// "cat" sentences are label 1, "dog" sentences label 0, in varied contexts.
Dataset animals() {
  const std::string dir = test::tiny_checkpoint("llama", "sequence_classification");
  static test::TempDir tmp;
  std::string lines;
  const std::vector<std::string> starts = {"the", "a", "my", "one", "that", "this", "her", "his"};
  const std::vector<std::string> ends = {"sat", "ran", "slept", "ate"};
  for (const auto& s : starts)
    for (const auto& e : ends)
      for (const char* animal : {"cat", "dog"})
        lines += nlohmann::json({{"text", s + " " + animal + " " + e}, {"label", std::string(animal) == "cat" ? 1 : 0}}).dump() + "\n";
  test::write_file(tmp / "animals.jsonl", lines);
  return load_jsonl(tmp / "animals.jsonl", Tokenizer::from_file(dir), DatasetOptions());
}

ModuleSet lora_model() {
  ModuleSet set(load_model(test::tiny_checkpoint("llama", "sequence_classification")));
  ModuleConfig c;
  c.lora.r = 8;
  c.lora.alpha = 16;
  c.targets.target_modules = {"all-linear"};
  c.seed = 7;
  set.add("lora", c);
  return set;
}

TrainOptions options(int64_t steps) {
  TrainOptions o;
  o.steps = steps;
  o.batch_size = 8;
  o.grad_accumulation = 2;
  o.schedule.kind = "linear";
  o.schedule.lr = 2e-2;
  o.schedule.warmup_steps = 2;
  o.schedule.total_steps = steps;
  o.seed = 3;
  return o;
}

TEST(Trainer, LoraLearnsATaskTheFrozenBackboneDoesNot) {
  Dataset data = animals();
  ModuleSet set = lora_model();
  test::TempDir out;
  TrainOptions o = options(40);
  o.out_dir = out.path();
  o.eval_every = 20;
  Trainer trainer(set, {"lora"}, o);
  const double before = trainer.evaluate(data);
  auto history = trainer.train(data, &data);
  const double after = trainer.evaluate(data);
  std::printf("[trainer] accuracy %.3f -> %.3f, loss %.3f -> %.3f\n", before, after, history.front().loss, history.back().loss);
  EXPECT_LT(before, 0.8);
  EXPECT_GE(after, 0.95);
  EXPECT_LT(history.back().loss, history.front().loss);
  EXPECT_EQ(history.size(), 40u);
  EXPECT_GE(history[19].eval, 0.0);  // evaluated at step 20
  EXPECT_LT(history[18].eval, 0.0);  // not at step 19
  // Only the module changed: the backbone and its head are frozen.
  EXPECT_EQ(set.summary().trainable, set.summary().total - set.model()->num_parameters());
  // metrics.jsonl has a line per step; the final checkpoint exists.
  const std::string metrics = test::read_file(out / "metrics.jsonl");
  EXPECT_EQ(std::count(metrics.begin(), metrics.end(), '\n'), 40);
  EXPECT_TRUE(std::filesystem::exists(out / "checkpoint/trainer.json"));
  EXPECT_TRUE(std::filesystem::exists(out / "checkpoint/modules/lora/module.safetensors"));
}

TEST(Trainer, ResumeEndsBitIdenticalToAnUninterruptedRun) {
  Dataset data = animals();
  ModuleSet straight = lora_model();
  Trainer(straight, {"lora"}, options(9)).train(data);

  test::TempDir tmp;
  ModuleSet first = lora_model();
  TrainOptions stop_at_4 = options(9);
  stop_at_4.steps = 4;  // same schedule (total_steps 9), stopped early
  Trainer a(first, {"lora"}, stop_at_4);
  a.train(data);  // a run killed after step 4: its checkpoint is what survives
  a.save_checkpoint(tmp / "ckpt");

  ModuleSet resumed = lora_model();  // a fresh process's state: same initialisation, nothing trained
  Trainer b(resumed, {"lora"}, options(9));
  b.load_checkpoint(tmp / "ckpt");
  EXPECT_EQ(b.step(), 4);
  b.train(data);
  for (const auto& [k, t] : straight.tensors("lora"))
    EXPECT_TRUE(at::equal(t, resumed.tensors("lora").at(k))) << k << " differs after resume";
  EXPECT_THROW_WITH(b.load_checkpoint(tmp / "nothing"), "is not a checkpoint");
}

}  // namespace
}  // namespace mdl
