#include "mdl/modules/peft_format.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <set>

#include "mdl/core/error.h"
#include "mdl/core/fields.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/json_file.h"
#include "mdl/io/safetensors.h"
#include "mdl/modules/module_type.h"

namespace fs = std::filesystem;

namespace mdl {
namespace {

const std::string kPrefix = "base_model.model.";

// PEFT tensor suffix -> mdl parameter name.
const std::vector<std::pair<std::string, std::string>> kLoraNames = {
    {".lora_A.weight", "lora_A"},
    {".lora_B.weight", "lora_B"},
    {".lora_B.bias", "lora_bias"},
    {".lora_magnitude_vector.weight", "lora_magnitude_vector"},
    {".lora_magnitude_vector", "lora_magnitude_vector"},
};
const std::vector<std::pair<std::string, std::string>> kIa3Names = {{".ia3_l.weight", "ia3_l"},
                                                                    {".ia3_l", "ia3_l"}};

bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

std::string task_type(HeadKind head) {
  switch (head) {
    case HeadKind::causal_lm:
      return "CAUSAL_LM";
    case HeadKind::sequence_classification:
      return "SEQ_CLS";
    case HeadKind::token_classification:
      return "TOKEN_CLS";
    case HeadKind::none:
      return "FEATURE_EXTRACTION";
  }
  return "";
}

std::string embedding_site(const ModelImpl& model) {
  for (const auto& s : model.sites())
    if (s->info().kind == SiteKind::embedding) return s->name();
  MDL_FAIL("[peft] ", model.config().architecture, " has no embedding site");
}

// PEFT prompt tuning: {"prompt_embeddings": (n, C)} and num_virtual_tokens / token_dim in the config.
PeftModule read_peft_prompt(const std::string& dir, const nlohmann::json& j, const ModelImpl& model) {
  PeftModule out;
  out.config.type = "prompt";
  out.config.prompt.num_virtual_tokens = j.value("num_virtual_tokens", int64_t(0));
  MDL_CHECK(j.value("num_transformer_submodules", 1) == 1, "[peft] '", dir,
            "': prompts for encoder-decoder models (num_transformer_submodules = 2) are not supported");
  const std::string weights = (fs::path(dir) / "adapter_model.safetensors").string();
  MDL_CHECK(fs::exists(weights), "[peft] '", dir, "' has no adapter_model.safetensors");
  auto tensors = io::load_safetensors(weights);
  MDL_CHECK(tensors.count("prompt_embeddings"), "[peft] '", weights, "' has no tensor 'prompt_embeddings'");
  at::Tensor p = tensors.at("prompt_embeddings");
  const int64_t C = model.config().hidden_size;
  MDL_CHECK(p.dim() == 2 && p.size(1) == C, "[peft] '", weights, "': prompt_embeddings has shape ", p.sizes(),
            ", this model needs (num_virtual_tokens, ", C, "); a prompt for another base model?");
  if (out.config.prompt.num_virtual_tokens == 0) out.config.prompt.num_virtual_tokens = p.size(0);
  MDL_CHECK(p.size(0) == out.config.prompt.num_virtual_tokens, "[peft] '", weights, "': ", p.size(0),
            " prompt vectors but num_virtual_tokens is ", out.config.prompt.num_virtual_tokens);
  const std::string site = embedding_site(model);
  out.sites = {site};
  out.tensors[site + ".prompt_embeddings"] = p;
  return out;
}

// PEFT prefix tuning, saved folded: {"prompt_embeddings": (n, num_layers * 2 * token_dim)}.
PeftModule read_peft_prefix(const std::string& dir, const ModelImpl& model) {
  const ModelConfig& mc = model.config();
  const std::string weights = (fs::path(dir) / "adapter_model.safetensors").string();
  MDL_CHECK(fs::exists(weights), "[peft] '", dir, "' has no adapter_model.safetensors");
  auto tensors = io::load_safetensors(weights);
  MDL_CHECK(tensors.count("prompt_embeddings"), "[peft] '", weights, "' has no tensor 'prompt_embeddings'");
  at::Tensor p = tensors.at("prompt_embeddings");
  const int64_t kv = mc.n_kv_head * mc.head_dim;
  MDL_CHECK(p.dim() == 2 && p.size(1) == mc.n_layer * 2 * kv, "[peft] '", weights,
            "': prompt_embeddings has shape ", p.sizes(), ", this model needs (num_virtual_tokens, ",
            mc.n_layer * 2 * kv, ") = (n, layers x 2 x ", kv, "); a prefix for another base model?");
  PeftModule out;
  out.config.type = "prefix";
  out.config.prefix.num_virtual_tokens = p.size(0);
  out.config.prefix.prefix_projection = false;  // PEFT saves the projection's output
  for (const auto& s : model.sites())
    if (s->info().kind == SiteKind::attention_kv) out.sites.push_back(s->name());
  out.tensors[out.sites.front() + ".encoder.embedding.weight"] = p;
  return out;
}

}  // namespace

const std::string kLabelsMetadata = "mdl.labels";

std::map<std::string, std::string> module_file_metadata(const ModuleConfig& c) {
  std::map<std::string, std::string> m = {{"format", "pt"}};
  if (!c.labels.empty()) m[kLabelsMetadata] = nlohmann::json(c.labels).dump();
  return m;
}

std::vector<std::string> labels_in_metadata(const io::SafetensorsFile& f) {
  const auto it = f.metadata().find(kLabelsMetadata);
  if (it == f.metadata().end()) return {};
  const nlohmann::json j = nlohmann::json::parse(it->second, nullptr, /*allow_exceptions=*/false);
  MDL_CHECK(j.is_array() && std::all_of(j.begin(), j.end(), [](const auto& v) { return v.is_string(); }),
            "[modules] '", f.path(), "': metadata '", kLabelsMetadata,
            "' must be a JSON array of label names, found '", it->second.substr(0, 80), "'");
  return j.get<std::vector<std::string>>();
}

PeftModule read_peft(const std::string& dir, const ModelImpl& model) {
  const std::string config_path = (fs::path(dir) / "adapter_config.json").string();
  const nlohmann::json j = io::read_json(config_path);
  MDL_CHECK(j.is_object() && j.contains("peft_type") && j["peft_type"].is_string(), "[peft] '", config_path,
            "' has no string field 'peft_type' (the only required field)");
  const std::string type = j["peft_type"].get<std::string>();
  PeftModule out;
  if (type == "LORA") {
    out.config.type = "lora";
    out.config.lora = lora_fields().read(j, UnknownKeys::ignore);  // PEFT's config has more keys
    MDL_CHECK(j.value("bias", std::string("none")) == "none", "[peft] '", config_path, "': bias='",
              j.value("bias", std::string()),
              "' trains the base model's biases; only bias=\"none\" is supported");
  } else if (type == "IA3") {
    out.config.type = "ia3";
    out.config.ia3 = ia3_fields().read(j, UnknownKeys::ignore);
  } else if (type == "PROMPT_TUNING" || type == "PREFIX_TUNING") {
    PeftModule m = type == "PROMPT_TUNING" ? read_peft_prompt(dir, j, model) : read_peft_prefix(dir, model);
    m.config.labels =
        labels_in_metadata(io::SafetensorsFile((fs::path(dir) / "adapter_model.safetensors").string()));
    return m;
  } else {
    MDL_FAIL("[peft] '", config_path, "': peft_type '", type,
             "' is not supported; supported: LORA, IA3, PROMPT_TUNING, PREFIX_TUNING");
  }
  out.config.targets = target_fields().read(j, UnknownKeys::ignore);

  std::string weights = (fs::path(dir) / "adapter_model.safetensors").string();
  MDL_CHECK(fs::exists(weights), "[peft] '", dir, "' has no adapter_model.safetensors",
            fs::exists(fs::path(dir) / "adapter_model.bin")
                ? " (only adapter_model.bin, a pickle mdl does not read)"
                : "");
  if (j.contains("modules_to_save") && !j["modules_to_save"].is_null()) {
    MDL_CHECK(j["modules_to_save"].is_array() &&
                  std::all_of(j["modules_to_save"].begin(), j["modules_to_save"].end(),
                              [](const auto& v) { return v.is_string(); }),
              "[peft] '", config_path, "': modules_to_save must be a list of module names or null, found ",
              j["modules_to_save"].dump().substr(0, 80));
    out.config.modules_to_save = j["modules_to_save"].get<std::vector<std::string>>();
  }
  const auto& names = type == "LORA" ? kLoraNames : kIa3Names;
  const std::string body = model.config().body_prefix() + ".";
  std::set<std::string> seen, copies;
  const io::SafetensorsFile file(weights);
  out.config.labels = labels_in_metadata(file);
  for (const auto& key : file.names()) {
    const at::Tensor tensor = file.tensor(key);
    MDL_CHECK(key.rfind(kPrefix, 0) == 0, "[peft] '", weights, "': tensor '", key, "' does not start with '",
              kPrefix, "'");
    std::string rest = key.substr(kPrefix.size()), param;
    for (const auto& [suffix, mine] : names) {
      if (ends_with(rest, suffix)) {
        rest = rest.substr(0, rest.size() - suffix.size());
        param = mine;
        break;
      }
    }
    // A layer PEFT saves whole (modules_to_save): "<module>.weight" / "<module>.bias".
    for (const std::string whole : {"weight", "bias"}) {
      const std::string suffix = "." + whole;
      if (!param.empty() || !ends_with(rest, suffix)) continue;
      const std::string layer = rest.substr(0, rest.size() - suffix.size());
      if (std::any_of(out.config.modules_to_save.begin(), out.config.modules_to_save.end(),
                      [&](const std::string& m) { return name_matches_suffix(layer, m); }))
        rest = layer, param = whole;
    }
    MDL_CHECK(!param.empty(), "[peft] '", weights, "': tensor '", key, "' is not a ", type,
              " tensor mdl knows (nor a layer that modules_to_save names)");
    // BertModel / GPT2Model / LlamaModel checkpoints name modules without the body prefix.
    std::string site = rest;
    bool known = model.find_site(site) != nullptr;
    if (!known && model.find_site(body + rest)) site = body + rest, known = true;
    MDL_CHECK(known, "[peft] '", weights, "': tensor '", key, "' targets '", rest, "', which ",
              model.config().architecture, " does not have; an adapter for another base model?");
    if (seen.insert(site).second) out.sites.push_back(site);
    if (param == "weight" || param == "bias") copies.insert(site);
    out.tensors[site + "." + param] = tensor;
  }
  MDL_CHECK(!out.sites.empty(), "[peft] '", weights, "' holds no tensors");
  // PEFT lists ["classifier", "score"] for every sequence-classification model: keep the names this file
  // holds a layer for.
  auto& saved = out.config.modules_to_save;
  saved.erase(std::remove_if(saved.begin(), saved.end(),
                             [&](const std::string& m) {
                               return std::none_of(copies.begin(), copies.end(), [&](const std::string& s) {
                                 return name_matches_suffix(s, m);
                               });
                             }),
              saved.end());
  // The config's rank (r, or rank_pattern for the site) sets the scale alpha / r: a tensor of another rank
  // makes the file contradict itself (PEFT refuses it with a size mismatch), so it is refused here too.
  if (out.config.type == "lora")
    for (const auto& site : out.sites) {
      if (copies.count(site)) continue;
      const auto a = out.tensors.find(site + ".lora_A");
      MDL_CHECK(a != out.tensors.end() && a->second.dim() == 2, "[peft] '", weights, "': site '", site,
                "' has no 2-D lora_A tensor");
      const int64_t r = a->second.size(0), want = out.config.lora.rank_alpha_for(site).first;
      MDL_CHECK(r == want, "[peft] '", config_path, "' gives site '", site, "' rank ", want,
                " (r or rank_pattern), but its lora_A in '", weights, "' has rank ", r,
                "; the files contradict each other (PEFT refuses them too)");
    }
  return out;
}

void write_peft(const ModuleSet& set, const std::string& name, const std::string& dir) {
  const ModuleConfig& c = set.config(name);
  const auto& formats = module_type(c.type).formats;
  MDL_CHECK(std::find(formats.begin(), formats.end(), "peft") != formats.end(), "[peft] module '", name,
            "' is a ", c.type,
            " module; PEFT files hold LoRA, (IA)^3, prompt or prefix tuning here (use the native format)");
  const ModelConfig& mc = set.model()->config();
  if (c.type == "prefix") {
    auto part = std::dynamic_pointer_cast<PrefixTuningImpl>(set.module_at(name, set.sites(name).front()));
    const at::Tensor p = part->encoder()->all().detach().contiguous();  // folded, as PEFT saves it
    nlohmann::json pj = {{"peft_type", "PREFIX_TUNING"},
                         {"num_virtual_tokens", p.size(0)},
                         {"token_dim", mc.n_kv_head * mc.head_dim},
                         {"num_transformer_submodules", 1},
                         {"num_attention_heads", mc.n_kv_head},
                         {"num_layers", mc.n_layer},
                         {"prefix_projection", false},
                         {"encoder_hidden_size", mc.hidden_size},
                         {"task_type", task_type(mc.head)},
                         {"base_model_name_or_path", mc.base_name()},
                         {"inference_mode", true}};
    io::AtomicDirectory staged(dir);  // both files or neither
    io::save_safetensors((fs::path(staged.path()) / "adapter_model.safetensors").string(),
                         {{"prompt_embeddings", p}}, module_file_metadata(c));
    io::write_text_atomic((fs::path(staged.path()) / "adapter_config.json").string(), pj.dump(2) + "\n");
    staged.commit();
    return;
  }
  if (c.type == "prompt") {
    const at::Tensor p = set.tensors(name).begin()->second.detach();
    nlohmann::json pj = {{"peft_type", "PROMPT_TUNING"},
                         {"num_virtual_tokens", p.size(0)},
                         {"token_dim", p.size(1)},
                         {"num_transformer_submodules", 1},
                         {"num_attention_heads", mc.n_head},
                         {"num_layers", mc.n_layer},
                         {"prompt_tuning_init", "RANDOM"},
                         {"task_type", task_type(mc.head)},
                         {"base_model_name_or_path", mc.base_name()},
                         {"inference_mode", true}};
    io::AtomicDirectory staged(dir);  // both files or neither
    io::save_safetensors((fs::path(staged.path()) / "adapter_model.safetensors").string(),
                         {{"prompt_embeddings", p}}, module_file_metadata(c));
    io::write_text_atomic((fs::path(staged.path()) / "adapter_config.json").string(), pj.dump(2) + "\n");
    staged.commit();
    return;
  }
  nlohmann::json j;
  std::vector<std::string> own, copies;  // the type's sites; the whole layers (modules_to_save)
  for (const auto& s : set.sites(name))
    (set.module_at(name, s)->type() == "modules_to_save" ? copies : own).push_back(s);
  if (c.type == "lora") {
    LoraOptions lo = c.lora;  // PEFT lists only the sites whose rank or alpha differs from r and lora_alpha
    for (auto it = lo.rank_pattern.begin(); it != lo.rank_pattern.end();)
      it = it->second == lo.r ? lo.rank_pattern.erase(it) : std::next(it);
    for (auto it = lo.alpha_pattern.begin(); it != lo.alpha_pattern.end();)
      it = it->second == lo.alpha ? lo.alpha_pattern.erase(it) : std::next(it);
    j = lo;
    j["peft_type"] = "LORA";
    j["init_lora_weights"] = c.lora.init == "gaussian" ? nlohmann::json("gaussian") : nlohmann::json(true);
    j["bias"] = "none";
    j["fan_in_fan_out"] = mc.arch == Arch::gpt2;  // GPT-2's Conv1D
  } else {
    j = c.ia3;
    j["peft_type"] = "IA3";
    j["fan_in_fan_out"] = mc.arch == Arch::gpt2;
  }
  // target_modules as PEFT writes it: the layers' names when they (with layers_to_transform) select
  // exactly the sites the file holds, else a regex over the full names.
  TargetOptions by_name;
  for (const auto& s : own) {
    const std::string last = s.substr(s.rfind('.') + 1);
    if (std::find(by_name.target_modules.begin(), by_name.target_modules.end(), last) ==
        by_name.target_modules.end())
      by_name.target_modules.push_back(last);
  }
  by_name.layers_to_transform = c.targets.layers_to_transform;
  std::vector<std::string> selected;
  for (const auto& s : match_sites(*set.model(), by_name, set.model()->site(own.front()).info().kind))
    if (std::find(copies.begin(), copies.end(), s->name()) == copies.end()) selected.push_back(s->name());
  if (selected == own) {
    j["target_modules"] = by_name.target_modules;
    if (!c.targets.layers_to_transform.empty()) j["layers_to_transform"] = c.targets.layers_to_transform;
  } else {
    j["target_modules"] = exact_sites_regex(own);
  }
  j["task_type"] = task_type(mc.head);
  j["base_model_name_or_path"] = mc.base_name();
  j["inference_mode"] = true;
  j["modules_to_save"] =
      c.modules_to_save.empty() ? nlohmann::json(nullptr) : nlohmann::json(c.modules_to_save);

  std::map<std::string, at::Tensor> out;
  for (const auto& [key, t] : set.tensors(name)) {
    const size_t dot = key.rfind('.');
    const std::string site = key.substr(0, dot), param = key.substr(dot + 1);
    std::string suffix;
    if (param == "lora_A")
      suffix = ".lora_A.weight";
    else if (param == "lora_B")
      suffix = ".lora_B.weight";
    else if (param == "lora_bias")
      suffix = ".lora_B.bias";
    else if (param == "lora_magnitude_vector")
      suffix = ".lora_magnitude_vector";
    else if (param == "ia3_l")
      suffix = ".ia3_l";
    else if ((param == "weight" || param == "bias") &&
             std::find(copies.begin(), copies.end(), site) != copies.end())
      suffix = "." + param;  // PEFT saves a modules_to_save layer under its own name
    else
      MDL_FAIL("[peft] parameter '", key, "' has no PEFT name");
    out[kPrefix + site + suffix] = t.detach();
  }
  io::AtomicDirectory staged(dir);  // both files or neither
  io::save_safetensors((fs::path(staged.path()) / "adapter_model.safetensors").string(), out,
                       module_file_metadata(c));
  io::write_text_atomic((fs::path(staged.path()) / "adapter_config.json").string(), j.dump(2) + "\n");
  staged.commit();
}

}  // namespace mdl
