#include "mdl/modules/adapterhub_format.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/json_file.h"
#include "mdl/io/safetensors.h"

namespace fs = std::filesystem;

namespace mdl {
namespace {

// AdapterHub's container of a sublayer's adapters <-> mdl's sublayer site.
std::string hub_container(const ModelImpl& model, const std::string& site) {
  const std::string p = model.config().body_prefix();
  const size_t dot = site.rfind('.');
  const std::string block = site.substr(0, dot), part = site.substr(dot + 1);
  if (model.config().arch == Arch::bert || model.config().arch == Arch::vit)
    return part == "attention" ? block + ".attention.output" : block + ".output";
  return block + (part == "mlp" ? ".output_adapters" : ".attention_adapters");
}

std::string site_of_container(const ModelImpl& model, const std::string& container) {
  for (const auto& s : model.sites())
    if (s->info().kind == SiteKind::sublayer && hub_container(model, s->name()) == container)
      return s->name();
  return "";
}

std::string activation_name(const std::string& hub) {
  std::string a = hub;
  for (auto& ch : a) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (a == "swish") a = "silu";
  if (a == "gelu_new") a = "gelu";
  return a;
}

}  // namespace

bool is_adapterhub_dir(const std::string& dir) {
  const fs::path cfg = fs::path(dir) / "adapter_config.json";
  std::error_code ec;
  if (!fs::is_regular_file(cfg, ec)) return false;
  try {
    auto j = io::read_json(cfg.string());
    return j.is_object() && j.contains("config") && j["config"].is_object() && !j.contains("peft_type");
  } catch (const std::exception&) {
    return false;
  }
}

PeftModule read_adapterhub(const std::string& dir, const ModelImpl& model) {
  const std::string cfg_path = (fs::path(dir) / "adapter_config.json").string();
  const nlohmann::json j = io::read_json(cfg_path);
  const nlohmann::json& c = j.at("config");
  const std::string name = j.value("name", std::string());
  const std::string where = "[adapterhub] '" + cfg_path + "': ";
  std::string weights = (fs::path(dir) / "adapter.safetensors").string();
  MDL_CHECK(fs::exists(weights), "[adapterhub] '", dir, "' has no adapter.safetensors",
            fs::exists(fs::path(dir) / "pytorch_adapter.bin")
                ? " (only pytorch_adapter.bin, a pickle mdl does not read)"
                : "");
  if (j.contains("hidden_size"))
    MDL_CHECK(j["hidden_size"].get<int64_t>() == model.config().hidden_size, where, "hidden_size ",
              j["hidden_size"].dump(), " but the model's is ", model.config().hidden_size,
              "; an adapter for another base model?");
  const std::string arch =
      c.value("architecture", std::string(c.contains("reduction_factor") ? "bottleneck" : ""));
  PeftModule out;
  const std::string marker = name.empty() ? "" : "." + name + ".";
  auto tensors = io::load_safetensors(weights);
  if (arch == "lora") {
    MDL_CHECK(c.value("composition_mode", std::string("add")) == "add", where, "LoRA composition_mode '",
              c.value("composition_mode", std::string()), "' is not supported (only add)");
    MDL_CHECK(!c.value("use_gating", false), where, "gated LoRA is not supported");
    out.config.type = "lora";
    out.config.lora.r = c.value("r", int64_t(8));
    out.config.lora.alpha = c.value("alpha", double(8));
    for (const auto& [key, t] : tensors) {
      const size_t at = key.find(".loras.");
      MDL_CHECK(at != std::string::npos, where, "tensor '", key,
                "' is not a LoRA tensor (<module>.loras.<name>.lora_A)");
      std::string site = key.substr(0, at);
      const std::string param = key.substr(key.rfind('.') + 1);
      MDL_CHECK(param == "lora_A" || param == "lora_B", where, "tensor '", key, "' is not lora_A or lora_B");
      bool known = model.linear_exists(site);
      if (!known && model.linear_exists(model.config().body_prefix() + "." + site))
        site = model.config().body_prefix() + "." + site, known = true;
      MDL_CHECK(known, where, "tensor '", key, "' targets '", site, "', which ", model.config().architecture,
                " does not have as a projection (AdapterHub's merged GPT-2 c_attn LoRA is not supported)");
      if (std::find(out.sites.begin(), out.sites.end(), site) == out.sites.end()) out.sites.push_back(site);
      out.tensors[site + "." + param] = t;
    }
  } else if (arch == "bottleneck") {
    MDL_CHECK(
        !c.value("original_ln_before", false), where,
        "original_ln_before=true (AdapterHub's seq_bn/Pfeiffer default) feeds the adapter the block's own "
        "LayerNorm output; mdl's adapters take the sublayer output (as double_seq_bn does): not supported "
        "yet");
    MDL_CHECK(!c.value("ln_after", false), where, "ln_after=true is not supported");
    MDL_CHECK(c.value("residual_before_ln", true) == true, where, "residual_before_ln must be true");
    MDL_CHECK(!c.value("use_gating", false) && !c.value("phm_layer", false), where,
              "gated or PHM bottlenecks are not supported");
    MDL_CHECK(c.contains("reduction_factor") && c["reduction_factor"].is_number(), where,
              "reduction_factor must be one number (per-layer maps are not supported)");
    MDL_CHECK(!c.contains("scaling") || c["scaling"].is_number(), where, "scaling '",
              c.value("scaling", nlohmann::json()).dump(), "' is not supported (only a number)");
    const bool parallel = c.value("is_parallel", false);
    MDL_CHECK(!parallel || model.config().arch == Arch::bert, where,
              "parallel adapters on pre-norm models take the un-normalised residual in AdapterHub; not "
              "supported yet");
    out.config.type = "adapter";
    out.config.adapter.reduction_factor = static_cast<int64_t>(c["reduction_factor"].get<double>());
    out.config.adapter.non_linearity = activation_name(c.value("non_linearity", std::string("relu")));
    out.config.adapter.layer_norm = c.value("ln_before", false);
    out.config.adapter.scaling = c.value("scaling", 1.0);
    out.config.adapter.config = parallel ? "parallel" : c.value("mh_adapter", false) ? "houlsby" : "pfeiffer";
    const bool ln = out.config.adapter.layer_norm;
    for (const auto& [key, t] : tensors) {
      const size_t at = key.find(".adapters" + marker);
      MDL_CHECK(at != std::string::npos, where, "tensor '", key, "' is not a bottleneck tensor of adapter '",
                name, "'");
      std::string container = key.substr(0, at);
      std::string site = site_of_container(model, container);
      if (site.empty()) site = site_of_container(model, model.config().body_prefix() + "." + container);
      MDL_CHECK(!site.empty(), where, "tensor '", key, "' sits in '", container, "', which ",
                model.config().architecture, " does not have; an adapter for another base model?");
      std::string param = key.substr(at + std::string(".adapters").size() + marker.size());
      if (param.rfind("adapter_norm_before.", 0) == 0)
        continue;  // the same LayerNorm as adapter_down.0 below
      if (ln && param.rfind("adapter_down.0.", 0) == 0)
        param = "adapter_norm_before." + param.substr(15);
      else if (ln && param.rfind("adapter_down.1.", 0) == 0)
        param = "adapter_down.0." + param.substr(15);
      if (std::find(out.sites.begin(), out.sites.end(), site) == out.sites.end()) out.sites.push_back(site);
      out.tensors[site + "." + param] = t;
    }
  } else {
    MDL_FAIL(where, "architecture '", arch, "' is not supported; supported: bottleneck, lora");
  }
  MDL_CHECK(!out.sites.empty(), "[adapterhub] '", weights, "' holds no tensors");
  // Keep forward order.
  std::vector<std::string> ordered;
  for (const auto& s : model.sites())
    if (std::find(out.sites.begin(), out.sites.end(), s->name()) != out.sites.end())
      ordered.push_back(s->name());
  out.sites = ordered;
  out.config.labels = labels_in_metadata(io::SafetensorsFile(weights));
  return out;
}

void write_adapterhub(const ModuleSet& set, const std::string& name, const std::string& dir) {
  const ModuleConfig& c = set.config(name);
  const ModelImpl& model = *set.model();
  const ModelConfig& mc = model.config();
  MDL_CHECK(c.modules_to_save.empty(), "[adapterhub] module '", name, "' trains whole layers with it (",
            "modules_to_save: ", nlohmann::json(c.modules_to_save).dump(),
            "); AdapterHub carries heads as its own prediction-head modules, which mdl does not write, so "
            "they would be lost: export to peft or native instead");
  nlohmann::json config;
  std::map<std::string, at::Tensor> out;
  if (c.type == "adapter") {
    const AdapterOptions& a = c.adapter;
    MDL_CHECK(a.config != "parallel" || mc.arch == Arch::bert, "[adapterhub] parallel adapters on ",
              mc.architecture, " have no AdapterHub equivalent (it feeds them the un-normalised residual)");
    bool mh = false, output = false;
    for (const auto& s : set.sites(name))
      (s.substr(s.rfind('.') + 1) == "mlp" || s.substr(s.rfind('.') + 1) == "output" ? output : mh) = true;
    config = {{"architecture", "bottleneck"},
              {"mh_adapter", mh},
              {"output_adapter", output},
              {"reduction_factor", a.reduction_factor},
              {"non_linearity", a.non_linearity},
              {"original_ln_before", false},
              {"original_ln_after", true},
              {"ln_before", a.layer_norm},
              {"ln_after", false},
              {"residual_before_ln", true},
              {"is_parallel", a.config == "parallel"},
              {"scaling", a.scaling},
              {"init_weights", "bert"},
              {"use_gating", false},
              {"phm_layer", false}};
    for (const auto& [key, t] : set.tensors(name)) {
      const std::string site = key.substr(0, key.find(".adapter_"));
      std::string param = key.substr(site.size() + 1);
      if (a.layer_norm && param.rfind("adapter_norm_before.", 0) == 0)
        param = "adapter_down.0." + param.substr(20);
      else if (a.layer_norm && param.rfind("adapter_down.0.", 0) == 0)
        param = "adapter_down.1." + param.substr(15);
      out[hub_container(model, site) + ".adapters." + name + "." + param] = t.detach();
    }
  } else if (c.type == "lora") {
    MDL_CHECK(!c.lora.use_dora && !c.lora.bias && !c.lora.use_rslora && c.lora.rank_pattern.empty(),
              "[adapterhub] module '", name,
              "': DoRA, lora_bias, rsLoRA and rank patterns have no AdapterHub form");
    for (const auto& s : set.sites(name))
      MDL_CHECK(!(mc.arch == Arch::gpt2 && s.find("c_attn") != std::string::npos),
                "[adapterhub] GPT-2's c_attn LoRA is a ", "merged linear in AdapterHub; not supported");
    config = {{"architecture", "lora"},     {"r", c.lora.r},
              {"alpha", c.lora.alpha},      {"dropout", c.lora.dropout},
              {"composition_mode", "add"},  {"init_weights", "lora"},
              {"use_gating", false},        {"selfattn_lora", true},
              {"intermediate_lora", false}, {"output_lora", false}};
    for (const auto& [key, t] : set.tensors(name)) {
      const size_t dot = key.rfind('.');
      out[key.substr(0, dot) + ".loras." + name + "." + key.substr(dot + 1)] = t.detach();
    }
  } else {
    MDL_FAIL("[adapterhub] module '", name, "' is a ", c.type,
             " module; AdapterHub files hold bottleneck adapters or LoRA here");
  }
  nlohmann::json j = {{"config", config},
                      {"hidden_size", mc.hidden_size},
                      {"model_type", mc.model_type},
                      {"model_name", mc.base_name()},
                      {"model_class", mc.architecture},
                      {"name", name},
                      {"version", "adapters.1.0.0"}};
  io::AtomicDirectory staged(dir);  // both files or neither
  io::save_safetensors((fs::path(staged.path()) / "adapter.safetensors").string(), out,
                       module_file_metadata(c));
  io::write_text_atomic((fs::path(staged.path()) / "adapter_config.json").string(), j.dump(2) + "\n");
  staged.commit();
}

}  // namespace mdl
