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
  } else if (type == "PROMPT_TUNING") {
    return read_peft_prompt(dir, j, model);
  } else if (type == "PREFIX_TUNING") {
    return read_peft_prefix(dir, model);
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
  const auto& names = type == "LORA" ? kLoraNames : kIa3Names;
  const std::string body = model.config().body_prefix() + ".";
  std::set<std::string> seen;
  for (auto& [key, tensor] : io::load_safetensors(weights)) {
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
    MDL_CHECK(!param.empty(), "[peft] '", weights, "': tensor '", key, "' is not a ", type,
              " tensor mdl knows");
    // BertModel / GPT2Model / LlamaModel checkpoints name modules without the body prefix.
    std::string site = rest;
    bool known = model.find_site(site) != nullptr;
    if (!known && model.find_site(body + rest)) site = body + rest, known = true;
    MDL_CHECK(known, "[peft] '", weights, "': tensor '", key, "' targets '", rest, "', which ",
              model.config().architecture, " does not have; an adapter for another base model?");
    if (seen.insert(site).second) out.sites.push_back(site);
    out.tensors[site + "." + param] = tensor;
  }
  MDL_CHECK(!out.sites.empty(), "[peft] '", weights, "' holds no tensors");
  // The config's rank (r, or rank_pattern for the site) sets the scale alpha / r: a tensor of another rank
  // makes the file contradict itself (PEFT refuses it with a size mismatch), so it is refused here too.
  if (out.config.type == "lora")
    for (const auto& site : out.sites) {
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
                         {{"prompt_embeddings", p}}, {{"format", "pt"}});
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
                         {{"prompt_embeddings", p}}, {{"format", "pt"}});
    io::write_text_atomic((fs::path(staged.path()) / "adapter_config.json").string(), pj.dump(2) + "\n");
    staged.commit();
    return;
  }
  nlohmann::json j;
  std::vector<std::string> targets;
  for (const auto& s : set.sites(name)) {
    const std::string last = s.substr(s.rfind('.') + 1);
    if (std::find(targets.begin(), targets.end(), last) == targets.end()) targets.push_back(last);
  }
  if (c.type == "lora") {
    j = c.lora;
    j["peft_type"] = "LORA";
    j["init_lora_weights"] = c.lora.init == "gaussian" ? nlohmann::json("gaussian") : nlohmann::json(true);
    j["bias"] = "none";
    j["fan_in_fan_out"] = mc.arch == Arch::gpt2;  // GPT-2's Conv1D
  } else {
    j = c.ia3;
    j["peft_type"] = "IA3";
    j["fan_in_fan_out"] = mc.arch == Arch::gpt2;
  }
  // Exact module list as a regex over full names, so the file targets exactly the sites it holds.
  j["target_modules"] = exact_sites_regex(set.sites(name));
  j["task_type"] = task_type(mc.head);
  j["base_model_name_or_path"] = mc.base_name();
  j["inference_mode"] = true;
  j["modules_to_save"] = nullptr;
  if (!c.targets.layers_to_transform.empty()) j["layers_to_transform"] = c.targets.layers_to_transform;

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
    else
      MDL_FAIL("[peft] parameter '", key, "' has no PEFT name");
    out[kPrefix + site + suffix] = t.detach();
  }
  io::AtomicDirectory staged(dir);  // both files or neither
  io::save_safetensors((fs::path(staged.path()) / "adapter_model.safetensors").string(), out,
                       {{"format", "pt"}});
  io::write_text_atomic((fs::path(staged.path()) / "adapter_config.json").string(), j.dump(2) + "\n");
  staged.commit();
}

}  // namespace mdl
