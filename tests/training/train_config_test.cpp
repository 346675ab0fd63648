// The run config: defaults, the help listing every field, and errors naming the field and file.
#include "mdl/training/train_config.h"

#include "test_util.h"

namespace mdl {
namespace {

TEST(TrainConfig, ParsesWithDefaultsAndDerivedTotalSteps) {
  TrainConfig c = parse_train_config(R"({"model": "m", "train_data": "t.jsonl",
      "modules": {"lora": {"type": "lora", "options": {"r": 4}}}, "options": {"steps": 30}})",
                                     "run.json");
  EXPECT_EQ(c.train, std::vector<std::string>{"lora"});
  EXPECT_EQ(c.modules.at("lora").lora.r, 4);
  EXPECT_EQ(c.options.schedule.total_steps, 30);
  EXPECT_TRUE(c.resume);
  EXPECT_EQ(c.data.kind, "classification");
}

TEST(TrainConfig, HelpDescribesEveryField) {
  const std::string help = train_config_help();  // throws if a field lacks a description
  for (const char* f :
       {"options.schedule.warmup_steps", "data.on_bad_record", "resume", "options.aux_loss_weight"})
    EXPECT_NE(help.find(f), std::string::npos) << f;
}

TEST(TrainConfig, ErrorsNameTheFieldAndFile) {
  EXPECT_THROW_WITH(parse_train_config(R"({"model": "m", "train_data": "t", "stepz": 3})", "run.json"),
                    "[train] 'run.json': unknown field 'stepz'; see mdl train --help-config");
  EXPECT_THROW_WITH(
      parse_train_config(R"({"train_data": "t", "modules": {"a": {"type": "lora"}}})", "run.json"),
      "field 'model' is required");
  EXPECT_THROW_WITH(parse_train_config(R"({"model": "m", "train_data": "t"})", "run.json"),
                    "nothing to train");
  EXPECT_THROW_WITH(
      parse_train_config(R"({"model": "m", "train_data": "t", "modules": {"a": {"type": "lora"}},
      "options": {"schedule": {"kind": "step"}}})",
                         "run.json"),
      "'run.json'", "kind 'step' is unknown");
  EXPECT_THROW_WITH(parse_train_config("{", "run.json"), "'run.json' is not valid JSON");
}

}  // namespace
}  // namespace mdl
