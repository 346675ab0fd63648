// What a careless user or an edited file gives the trainer: labels that would size a table by their
// value, batches past memory, a checkpoint whose fields are garbage, a loss that turns NaN. Each stops
// with an error that names the line, the field or the step, before anything is allocated or updated.
#include <ATen/ATen.h>
#include <torch/utils.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "backbones/fixtures.h"
#include "mdl/io/json_file.h"
#include "mdl/io/safetensors.h"
#include "mdl/modules/module_set.h"
#include "mdl/tokenizers/tokenizer.h"
#include "mdl/training/trainer.h"
#include "test_util.h"

namespace mdl {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string classifier() {
  return test::tiny_checkpoint("llama", "sequence_classification");
}

Dataset data_of(const test::TempDir& dir, const std::string& lines, DatasetOptions o = {}) {
  test::write_file(dir / "d.jsonl", lines);
  return load_jsonl(dir / "d.jsonl", Tokenizer::from_file(classifier()), o);
}

TrainOptions small_run(int64_t steps) {
  TrainOptions o;
  o.steps = steps;
  o.batch_size = 4;
  o.schedule.lr = 1e-2;
  o.schedule.total_steps = steps;
  return o;
}

// The probe's label of 1000000000 built a table of 10^9 names; --on-bad-record skip did not catch it.
TEST(HostileTraining, HugeIntegerLabelsAreRefusedWithTheLine) {
  test::TempDir dir;
  const std::string lines =
      "{\"text\": \"a cat\", \"label\": 1}\n{\"text\": \"a dog\", \"label\": 1000000000}\n";
  EXPECT_THROW_WITH(data_of(dir, lines), "d.jsonl:2", "label 1000000000 out of range",
                    "class ids in 0..65535");
  DatasetOptions skip;
  skip.on_bad_record = "skip";
  const Dataset d = data_of(dir, lines, skip);
  EXPECT_EQ(d.examples.size(), 1u);
  EXPECT_EQ(d.skipped, 1);
  EXPECT_EQ(d.labels.size(), 2u) << "the table holds the labels seen, not one per id up to 10^9";
  EXPECT_THROW_WITH(data_of(dir, "{\"text\": \"x\", \"label\": -1}\n"), "d.jsonl:1", "label -1 out of range");
}

TEST(HostileTraining, SizesPastMemoryAreRefusedBeforeTheFirstStep) {
  TrainOptions o = small_run(2);
  o.batch_size = 1000000000;
  EXPECT_THROW_WITH(validate(o), "options.batch_size 1000000000", "at most 65536");
  o.batch_size = 4;
  o.grad_accumulation = 1 << 20;
  EXPECT_THROW_WITH(validate(o), "options.grad_accumulation 1048576");
}

// The probe's run went on with "loss": null for thousands of steps. It stops at the first non-finite
// loss, naming the step and the records, without updating anything.
TEST(HostileTraining, ANonFiniteLossStopsTheRunAtItsStep) {
  test::TempDir dir;
  std::string lines;
  for (int i = 0; i < 8; ++i)
    lines += "{\"text\": \"the cat " + std::to_string(i) + "\", \"label\": " + std::to_string(i % 2) + "}\n";
  const Dataset data = data_of(dir, lines);
  ModuleSet set(load_model(classifier()));
  set.add("lora", ModuleConfig());
  {
    torch::NoGradGuard g;  // a diverged backbone: one weight overflowed
    set.model()->named_parameters()["score.weight"].fill_(std::numeric_limits<float>::infinity());
  }
  const auto before = set.tensors("lora").begin()->second.clone();
  Trainer t(set, {"lora"}, small_run(5));
  EXPECT_THROW_WITH(t.train(data), "[train] step 1: the loss is", "on a batch of 4 examples (line",
                    "no update was made", "options.schedule.lr");
  EXPECT_EQ(t.step(), 0);
  EXPECT_TRUE(at::equal(set.tensors("lora").begin()->second, before));
}

// The probe's "step": -5 segfaulted on resume. Every field of trainer.json and the optimizer file is
// checked; the error names the file and the field.
TEST(HostileTraining, ACheckpointWithBadFieldsIsRefusedOnResume) {
  test::TempDir dir;
  std::string lines;
  for (int i = 0; i < 8; ++i)
    lines += "{\"text\": \"a dog " + std::to_string(i) + "\", \"label\": " + std::to_string(i % 2) + "}\n";
  const Dataset data = data_of(dir, lines);
  ModuleSet set(load_model(classifier()));
  set.add("lora", ModuleConfig());
  Trainer first(set, {"lora"}, small_run(2));
  first.train(data);
  first.save_checkpoint(dir / "ckpt");
  const json good = io::read_json(dir / "ckpt/trainer.json");
  struct Case {
    std::string field;
    json value;
    std::string message;
  };
  for (const Case& c :
       std::vector<Case>{{"step", -5, "field 'step' is -5"},
                         {"step", 10, "field 'step' is 10; a checkpoint of this run is at a step in 0..4"},
                         {"step", "two", "field 'step' must be an integer"},
                         {"modules", "lora", "field 'modules' must be a list"},
                         {"modules", json::array({"other"}), "this run trains other modules"},
                         {"best", "high", "field 'best' must be a finite number or null"},
                         {"evals_since_best", -1, "field 'evals_since_best' must be an integer >= 0"}}) {
    json j = good;
    j[c.field] = c.value;
    test::write_file(dir / "ckpt/trainer.json", j.dump());
    ModuleSet other(load_model(classifier()));
    other.add("lora", ModuleConfig());
    Trainer t(other, {"lora"}, small_run(4));
    EXPECT_THROW_WITH(t.load_checkpoint(dir / "ckpt"), "trainer.json", c.message.c_str());
  }
  test::write_file(dir / "ckpt/trainer.json", good.dump());
  auto moments = io::load_safetensors(dir / "ckpt/optimizer.safetensors");
  std::map<std::string, at::Tensor> broken;
  for (const auto& [k, v] : moments)
    broken[k] = k.find(".exp_avg_sq") != std::string::npos ? at::zeros({3}) : v.clone();
  io::save_safetensors(dir / "ckpt/optimizer.safetensors", broken);
  ModuleSet other(load_model(classifier()));
  other.add("lora", ModuleConfig());
  Trainer t(other, {"lora"}, small_run(4));
  EXPECT_THROW_WITH(t.load_checkpoint(dir / "ckpt"), "optimizer.safetensors",
                    ".exp_avg_sq' is missing or not a floating tensor of shape");
}

}  // namespace
}  // namespace mdl
