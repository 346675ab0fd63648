// Module files that would load into garbage: non-finite weights, integer weights, a PEFT config whose
// rank contradicts its tensors, names that are not directory names. Each is refused at load, naming the
// file and the tensor; a write that fails leaves the directory as it was.
#include <ATen/ATen.h>
#include <torch/utils.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "backbones/fixtures.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/json_file.h"
#include "mdl/io/safetensors.h"
#include "mdl/modules/module_set.h"
#include "mdl/modules/peft_format.h"
#include "test_util.h"

namespace mdl {
namespace {

namespace fs = std::filesystem;

// Rewrites the tensors of a module file with `edit`.
void edit_tensors(const std::string& file,
                  const std::function<void(std::map<std::string, at::Tensor>&)>& edit) {
  std::map<std::string, at::Tensor> owned;
  for (auto& [k, v] : io::load_safetensors(file)) owned[k] = v.clone();
  edit(owned);
  io::save_safetensors(file, owned);
}

TEST(ModuleFiles, NonFiniteAndIntegerWeightsAreRefusedNamingTheTensor) {
  const std::string model = test::tiny_checkpoint("llama");
  test::TempDir dir;
  ModuleSet set(load_model(model));
  set.add("m", ModuleConfig());
  for (const std::string format : {"native", "peft"}) {
    const std::string out = dir / format;
    if (format == "native")
      set.save("m", out);
    else
      write_peft(set, "m", out);
    const std::string file =
        out + (format == "native" ? "/module.safetensors" : "/adapter_model.safetensors");
    const auto original = io::load_safetensors(file);
    const std::string first = original.begin()->first;
    for (const float bad :
         {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
      edit_tensors(file, [&](auto& t) { t[first].view(-1)[0] = bad; });
      ModuleSet other(load_model(model));
      EXPECT_THROW_WITH(other.load(out, "m"), "values that are NaN or infinite",
                        "a corrupt or diverged module");
      EXPECT_FALSE(other.contains("m")) << "a refused module stays out";
    }
    edit_tensors(file, [&](auto& t) { t[first] = t[first].to(at::kInt); });
    ModuleSet other(load_model(model));
    EXPECT_THROW_WITH(other.load(out, "m"), "is Int but this parameter is Float", "floating point");
  }
}

// The probe's PEFT file said r=8 over rank-4 tensors: mdl took the tensors' rank and the config's alpha,
// a scale neither PEFT nor the file meant.
TEST(ModuleFiles, APeftRankThatContradictsItsTensorsIsRefused) {
  const std::string model = test::tiny_checkpoint("llama");
  test::TempDir dir;
  ModuleSet set(load_model(model));
  ModuleConfig c;
  c.lora.r = 4;
  set.add("m", c);
  write_peft(set, "m", dir / "peft");
  nlohmann::json j = io::read_json(dir / "peft/adapter_config.json");
  j["r"] = 8;
  test::write_file(dir / "peft/adapter_config.json", j.dump());
  ModuleSet other(load_model(model));
  EXPECT_THROW_WITH(other.load(dir / "peft", "m"), "adapter_config.json' gives site",
                    "rank 8 (r or rank_pattern)", "has rank 4", "contradict");
}

TEST(ModuleFiles, NamesAreDirectoryNames) {
  ModuleSet set(load_model(test::tiny_checkpoint("llama")));
  for (const std::string name : {"modül", "my module", "日本", "a.b-c_d"})
    EXPECT_NO_THROW(set.add(name, ModuleConfig())) << name;
  EXPECT_THROW_WITH(set.add("", ModuleConfig()), "it is empty");
  EXPECT_THROW_WITH(set.add("a/b", ModuleConfig()), "it has a '/'");
  EXPECT_THROW_WITH(set.add(".hidden", ModuleConfig()), "it starts with '.'");
  EXPECT_THROW_WITH(set.add("a\nb", ModuleConfig()), "a control character");
  EXPECT_THROW_WITH(set.add("\xC3", ModuleConfig()), "not valid UTF-8");
  EXPECT_THROW_WITH(set.add(std::string(201, 'a'), ModuleConfig()), "over 200 bytes");
}

// A module directory is written whole: two files that belong together, or neither, and what was there
// before stays until the new one is complete.
TEST(ModuleFiles, SavingOverAModuleReplacesItWhole) {
  const std::string model = test::tiny_checkpoint("llama");
  test::TempDir dir;
  ModuleSet set(load_model(model));
  ModuleConfig a;
  a.lora.r = 2;
  set.add("a", a);
  set.save("a", dir / "m");
  ModuleConfig b;
  b.type = "ia3";
  set.add("b", b);
  set.save("b", dir / "m");
  EXPECT_EQ(io::read_json(dir / "m/module.json")["type"], "ia3");
  ModuleSet other(load_model(model));
  EXPECT_EQ(other.load(dir / "m"), "m");
  EXPECT_EQ(other.config("m").type, "ia3");
  size_t entries = 0;
  for (const auto& e : fs::directory_iterator(dir.path())) {
    ++entries;
    EXPECT_EQ(e.path().filename(), "m");
  }
  EXPECT_EQ(entries, 1u) << "no temporary or old directory is left";
}

}  // namespace
}  // namespace mdl
