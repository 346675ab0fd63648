#include "mdl/modules/native_format.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/json_file.h"
#include "mdl/io/safetensors.h"

namespace fs = std::filesystem;

namespace mdl {

ModuleFiles read_native(const std::string& dir) {
  const fs::path path(dir);
  ModuleFiles f;
  f.dir = dir;
  f.format = "native";
  const fs::path meta = path / "module.json";
  const nlohmann::json j = io::read_json(meta.string());
  MDL_CHECK(j.is_object() && j.value("format", std::string()) == "mdl-module", "[modules] '", meta.string(),
            "' is not an mdl module (field 'format' must be \"mdl-module\")");
  try {
    f.config = j.at("config").get<ModuleConfig>();
  } catch (const nlohmann::json::exception& e) {
    MDL_FAIL("[modules] '", meta.string(), "': bad field 'config': ", e.what());
  } catch (const Error& e) {  // a field list's refusal: an unknown option, a value of the wrong type or range
    MDL_FAIL("[modules] '", meta.string(), "': bad field 'config': ", e.what());
  }
  try {
    f.sites = j.at("sites").get<std::vector<std::string>>();
  } catch (const nlohmann::json::exception&) {
    MDL_FAIL("[modules] '", meta.string(), "': field 'sites' must be a list of site names");
  }
  f.tensors = io::load_safetensors((path / "module.safetensors").string());
  const auto& b = j.contains("base") && j["base"].is_object() ? j["base"] : nlohmann::json::object();
  try {
    f.made_for = BaseFingerprint{b.value("architecture", std::string()), b.value("hidden_size", int64_t(0)),
                                 b.value("n_layer", int64_t(0)), b.value("vocab_size", int64_t(0)),
                                 b.value("shapes_hash", std::string())};
  } catch (const nlohmann::json::exception&) {
    MDL_FAIL("[modules] '", meta.string(), "': field 'base' has a value of the wrong type");
  }
  return f;
}

void write_native(const ModuleSet& set, const std::string& name, const std::string& dir) {
  const ModuleConfig& config = set.config(name);
  io::AtomicDirectory staged(dir);  // both files or neither
  BaseFingerprint f = set.fingerprint(name);
  int64_t count = 0;
  auto tensors = set.tensors(name);
  for (const auto& [k, t] : tensors) count += t.numel();
  nlohmann::json j = {{"format", "mdl-module"},
                      {"version", 1},
                      {"name", name},
                      {"type", config.type},
                      {"config", config},
                      {"sites", set.sites(name)},
                      {"parameters", count},
                      {"base",
                       {{"architecture", f.architecture},
                        {"hidden_size", f.hidden_size},
                        {"n_layer", f.n_layer},
                        {"vocab_size", f.vocab_size},
                        {"shapes_hash", f.shapes_hash}}}};
  io::save_safetensors((fs::path(staged.path()) / "module.safetensors").string(), tensors,
                       {{"format", "mdl-module"}});
  io::write_text_atomic((fs::path(staged.path()) / "module.json").string(), j.dump(2) + "\n");
  staged.commit();
}

}  // namespace mdl
