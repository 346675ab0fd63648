// Native module directories: what write_native writes, read_native reads back (config, sites, tensors,
// the base's fingerprint), and a module.json that is not one is refused naming the file and the field.
#include "mdl/modules/native_format.h"

#include <ATen/ATen.h>

#include <nlohmann/json.hpp>

#include "backbones/fixtures.h"
#include "mdl/io/json_file.h"
#include "test_util.h"

namespace mdl {
namespace {

TEST(NativeFormat, WhatIsWrittenReadsBack) {
  ModuleSet set(load_model(test::tiny_checkpoint("llama")));
  ModuleConfig c;
  c.lora.r = 3;
  c.lora.init = "random";
  set.add("m", c);
  test::TempDir dir;
  const std::string out = dir / "m";
  write_native(set, "m", out);
  const ModuleFiles f = read_native(out);
  EXPECT_EQ(f.format, "native");
  EXPECT_EQ(f.sites, set.sites("m"));
  EXPECT_EQ(nlohmann::json(f.config), nlohmann::json(set.config("m")));
  EXPECT_TRUE(f.made_for == set.fingerprint("m"));
  const auto want = set.tensors("m");
  ASSERT_EQ(f.tensors.size(), want.size());
  for (const auto& [k, t] : want) EXPECT_TRUE(at::equal(f.tensors.at(k), t)) << k;
  const nlohmann::json j = io::read_json(out + "/module.json");
  EXPECT_EQ(j["format"], "mdl-module");
  EXPECT_EQ(j["type"], "lora");
  int64_t count = 0;
  for (const auto& [k, t] : want) count += t.numel();
  EXPECT_EQ(j["parameters"], count);
}

// The label names a module was trained with are written with it and read back (and only where there are
// some); agreeing modules share them, disagreeing ones are refused together.
TEST(NativeFormat, LabelsTravelWithTheModule) {
  ModuleSet set(load_model(test::tiny_checkpoint("llama")));
  set.add("m", ModuleConfig());
  set.add("plain", ModuleConfig());
  set.set_labels("m", {"negative", "positive"});
  test::TempDir dir;
  write_native(set, "m", dir / "m");
  write_native(set, "plain", dir / "plain");
  EXPECT_EQ(read_native(dir / "m").config.labels, (std::vector<std::string>{"negative", "positive"}));
  EXPECT_FALSE(io::read_json(dir / "plain/module.json")["config"].contains("labels"));
  ModuleSet other(load_model(test::tiny_checkpoint("llama")));
  other.load(dir / "m", "a");
  other.load(dir / "m", "b");
  other.load(dir / "plain", "c");
  EXPECT_EQ(other.labels(), (std::vector<std::string>{"negative", "positive"}));
  EXPECT_TRUE(other.labels({"c"}).empty());
  other.set_labels("b", {"cat", "dog"});
  EXPECT_THROW_WITH(other.labels(), "'a' and 'b' were trained with different labels");
  nlohmann::json j = io::read_json(dir / "m/module.json");
  j["config"]["labels"] = {1, 2};
  test::write_file(dir / "m/module.json", j.dump());
  EXPECT_THROW_WITH(read_native(dir / "m"), "field 'labels' must be an array of label names");
}

TEST(NativeFormat, AModuleJsonThatIsNotOneIsRefusedNamingTheField) {
  ModuleSet set(load_model(test::tiny_checkpoint("llama")));
  set.add("m", ModuleConfig());
  test::TempDir dir;
  const std::string out = dir / "m";
  write_native(set, "m", out);
  const std::string meta = out + "/module.json";
  const nlohmann::json good = io::read_json(meta);
  auto with = [&](const std::function<void(nlohmann::json&)>& edit) {
    nlohmann::json j = good;
    edit(j);
    test::write_file(meta, j.dump());
  };
  with([](nlohmann::json& j) { j["format"] = "peft"; });
  EXPECT_THROW_WITH(read_native(out), meta.c_str(), "is not an mdl module",
                    "'format' must be \"mdl-module\"");
  with([](nlohmann::json& j) { j["sites"] = "q_proj"; });
  EXPECT_THROW_WITH(read_native(out), meta.c_str(), "field 'sites' must be a list of site names");
  with([](nlohmann::json& j) { j["config"]["options"] = {{"r", "four"}}; });
  EXPECT_THROW_WITH(read_native(out), meta.c_str(), "bad field 'config'");
  with([](nlohmann::json& j) { j["base"]["hidden_size"] = "wide"; });
  EXPECT_THROW_WITH(read_native(out), meta.c_str(), "field 'base' has a value of the wrong type");
  with([](nlohmann::json&) {});
  std::filesystem::remove(out + "/module.safetensors");
  EXPECT_THROW_WITH(read_native(out), "module.safetensors");
}

}  // namespace
}  // namespace mdl
