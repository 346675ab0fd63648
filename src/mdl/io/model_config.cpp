#include "mdl/io/model_config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/json_file.h"

namespace mdl {
namespace {

using json = nlohmann::json;

// Upper bounds of a config's sizes: far above any released checkpoint, far below what would exhaust memory
// before a tensor is read.
constexpr int64_t kMaxVocab = int64_t{1} << 22, kMaxHidden = int64_t{1} << 16, kMaxLayers = 1024,
                  kMaxHeads = 1024, kMaxIntermediate = int64_t{1} << 18, kMaxPositions = int64_t{1} << 22;

struct Reader {
  const json& j;
  const std::string& source;

  bool has(const char* key) const { return j.contains(key) && !j[key].is_null(); }

  int64_t required_int(const char* key) const {
    MDL_CHECK(has(key), "[config] '", source, "' is missing required field '", key, "'");
    MDL_CHECK(j[key].is_number_integer(), "[config] '", source, "': field '", key,
              "' must be an integer, found ", j[key].dump());
    int64_t v = j[key].get<int64_t>();
    MDL_CHECK(v > 0, "[config] '", source, "': field '", key, "' must be > 0, found ", v);
    return v;
  }
  int64_t int_or(const char* key, int64_t fallback) const {
    if (!has(key)) return fallback;
    MDL_CHECK(j[key].is_number_integer(), "[config] '", source, "': field '", key,
              "' must be an integer, found ", j[key].dump());
    return j[key].get<int64_t>();
  }
  double num_or(const char* key, double fallback) const {
    if (!has(key)) return fallback;
    MDL_CHECK(j[key].is_number(), "[config] '", source, "': field '", key, "' must be a number, found ",
              j[key].dump());
    return j[key].get<double>();
  }
  bool bool_or(const char* key, bool fallback) const {
    if (!has(key)) return fallback;
    MDL_CHECK(j[key].is_boolean(), "[config] '", source, "': field '", key, "' must be true or false, found ",
              j[key].dump());
    return j[key].get<bool>();
  }
  // The same, with the range a real checkpoint's value lies in: a value outside is refused before
  // anything is sized by it (1e9 layers, a negative epsilon).
  int64_t required_int(const char* key, int64_t hi) const { return in_range(key, required_int(key), 1, hi); }
  int64_t int_or(const char* key, int64_t fallback, int64_t lo, int64_t hi) const {
    return in_range(key, int_or(key, fallback), lo, hi);
  }
  double num_or(const char* key, double fallback, double lo, double hi) const {
    const double v = num_or(key, fallback);
    MDL_CHECK(std::isfinite(v) && v >= lo && v <= hi, "[config] '", source, "': field '", key, "' is ", v,
              "; expected a finite number in [", lo, ", ", hi, "]");
    return v;
  }
  int64_t in_range(const char* key, int64_t v, int64_t lo, int64_t hi) const {
    MDL_CHECK(v >= lo && v <= hi, "[config] '", source, "': field '", key, "' is ", v, "; expected ", lo,
              "..", hi, " (what a checkpoint can hold; the model is sized by it)");
    return v;
  }
  std::string str_or(const char* key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    MDL_CHECK(j[key].is_string(), "[config] '", source, "': field '", key, "' must be a string, found ",
              j[key].dump());
    return j[key].get<std::string>();
  }
};

HeadKind head_from_architecture(const std::string& a) {
  auto ends = [&](const char* s) {
    std::string suffix(s);
    return a.size() >= suffix.size() && a.compare(a.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  if (ends("ForCausalLM") || ends("LMHeadModel")) return HeadKind::causal_lm;
  if (ends("ForSequenceClassification") || ends("ForImageClassification"))
    return HeadKind::sequence_classification;
  if (ends("ForTokenClassification")) return HeadKind::token_classification;
  if (ends("Model")) return HeadKind::none;
  MDL_FAIL("[config] architecture '", a,
           "' is not supported; expected a *ForCausalLM, *LMHeadModel, *ForSequenceClassification, "
           "*ForTokenClassification or *Model class");
}

/// Mixtral's expert fields (also an upcycled ViT's): num_local_experts, num_experts_per_tok, the aux loss
/// coefficient and mdl's router override.
void read_experts(const Reader& r, ModelConfig& c) {
  c.num_experts = r.required_int("num_local_experts", 1024);
  c.experts_per_token = r.int_or("num_experts_per_tok", 2);
  c.router_aux_loss_coef = r.num_or("router_aux_loss_coef", 0.0, 0.0, 1e6);
  MDL_CHECK(c.num_experts > 0 && c.experts_per_token > 0 && c.experts_per_token <= c.num_experts,
            "[config] '", r.source, "': num_experts_per_tok ", c.experts_per_token,
            " must be in 1..num_local_experts (", c.num_experts, ")");
  if (r.has("mdl_router")) {
    MDL_CHECK(r.j["mdl_router"].is_object(), "[config] '", r.source, "': 'mdl_router' must be an object");
    c.router_json = r.j["mdl_router"].dump();
  }
}

/// ModuleFormer's fields under IBM's names (configuration_moduleformer.py), with its defaults.
void read_moduleformer(const Reader& r, ModelConfig& c) {
  c.vocab_size = r.required_int("vocab_size", kMaxVocab);
  c.hidden_size = r.required_int("n_embd", kMaxHidden);
  c.n_layer = r.required_int("n_layer", kMaxLayers);
  c.n_head = r.required_int("n_head", kMaxHeads);
  c.n_kv_head = c.n_head;
  c.att_hidden = r.int_or("att_hidden", 512, 1, kMaxHidden);
  c.intermediate_size = r.int_or("ffd_hidden", 2048, 1, kMaxIntermediate);
  c.num_att_experts = r.int_or("n_att_experts", 32, 1, 1024);
  c.att_experts_per_token = r.int_or("k_att", 2, 1, 1024);
  c.num_experts = r.int_or("n_mlp_experts", 32, 1, 1024);
  c.experts_per_token = r.int_or("k_mlp", 2, 1, 1024);
  c.gating_size = r.int_or("gating_size", 256, 1, kMaxHidden);
  c.gate_type = r.str_or("gate_type", "mlp");
  c.aux_loss_type = r.str_or("aux_loss_type", "mi");
  c.router_aux_loss_coef = r.num_or("aux_loss_weight", 0.0, 0.0, 1e6);
  c.sample_topk = r.int_or("sample_topk", 0, 0, 1024);
  c.max_position =
      r.int_or("block_size", 512, 1, kMaxPositions) + r.int_or("history_length", 512, 0, kMaxPositions);
  c.norm_eps = r.num_or("layer_norm_epsilon", 1e-5, 0.0, 1.0);
  c.activation = r.str_or("activation_function", "gelu_new");
  c.tie_word_embeddings = r.bool_or("tie_word_embeddings", false);
  c.bos_token_id = r.int_or("bos_token_id", 50256);
  MDL_CHECK(c.att_hidden % c.n_head == 0, "[config] '", r.source, "': att_hidden ", c.att_hidden,
            " must be a multiple of n_head ", c.n_head, " (each attention expert has n_head heads)");
  MDL_CHECK(c.att_experts_per_token <= c.num_att_experts && c.experts_per_token <= c.num_experts,
            "[config] '", r.source, "': k_att ", c.att_experts_per_token, " and k_mlp ", c.experts_per_token,
            " must be at most n_att_experts ", c.num_att_experts, " and n_mlp_experts ", c.num_experts);
  MDL_CHECK(c.sample_topk <= std::min(c.att_experts_per_token, c.experts_per_token), "[config] '", r.source,
            "': sample_topk ", c.sample_topk, " must be at most k_att and k_mlp");
  MDL_CHECK(c.gate_type == "linear" || c.gate_type == "mlp" || c.gate_type == "gmm", "[config] '", r.source,
            "': gate_type '", c.gate_type, "' is unknown; expected linear, mlp or gmm");
  MDL_CHECK(c.aux_loss_type == "mi" || c.aux_loss_type == "switch", "[config] '", r.source,
            "': aux_loss_type '", c.aux_loss_type, "' is unknown; expected mi or switch");
  if (r.has("mdl_router")) {
    MDL_CHECK(r.j["mdl_router"].is_object(), "[config] '", r.source, "': 'mdl_router' must be an object");
    c.router_json = r.j["mdl_router"].dump();
  }
}

}  // namespace

Arch parse_arch(const std::string& name) {
  if (name == "gpt2") return Arch::gpt2;
  if (name == "llama" || name == "mistral" || name == "qwen2" || name == "mixtral") return Arch::llama;
  if (name == "bert") return Arch::bert;
  if (name == "vit") return Arch::vit;
  if (name == "moduleformer") return Arch::moduleformer;
  MDL_FAIL("[config] unknown architecture '", name,
           "'; expected gpt2, llama, mistral, qwen2, mixtral, bert, vit or moduleformer");
}

std::string arch_name(Arch arch) {
  switch (arch) {
    case Arch::gpt2:
      return "gpt2";
    case Arch::llama:
      return "llama";
    case Arch::bert:
      return "bert";
    case Arch::vit:
      return "vit";
    case Arch::moduleformer:
      return "moduleformer";
  }
  return "?";
}

std::string head_name(HeadKind head) {
  switch (head) {
    case HeadKind::none:
      return "none";
    case HeadKind::causal_lm:
      return "causal_lm";
    case HeadKind::sequence_classification:
      return "sequence_classification";
    case HeadKind::token_classification:
      return "token_classification";
  }
  return "?";
}

std::string ModelConfig::body_prefix() const {
  switch (arch) {
    case Arch::gpt2:
    case Arch::moduleformer:
      return "transformer";
    case Arch::llama:
      return "model";
    case Arch::bert:
      return "bert";
    case Arch::vit:
      return "vit";
  }
  return "";
}

std::string architecture_name(Arch arch, HeadKind head) {
  std::string family = arch == Arch::gpt2           ? "GPT2"
                       : arch == Arch::llama        ? "Llama"
                       : arch == Arch::vit          ? "ViT"
                       : arch == Arch::moduleformer ? "ModuleFormer"
                                                    : "Bert";
  if (arch == Arch::vit && head == HeadKind::sequence_classification) return "ViTForImageClassification";
  switch (head) {
    case HeadKind::none:
      return family + "Model";
    case HeadKind::causal_lm:
      return arch == Arch::gpt2 ? "GPT2LMHeadModel" : family + "ForCausalLM";
    case HeadKind::sequence_classification:
      return family + "ForSequenceClassification";
    case HeadKind::token_classification:
      return family + "ForTokenClassification";
  }
  return family;
}

ModelConfig parse_model_config(const std::string& json_text, const std::string& source) {
  const json j = io::parse_json(json_text, source);
  MDL_CHECK(j.is_object(), "[config] '", source, "' must hold a JSON object, found ", j.type_name());
  Reader r{j, source};
  ModelConfig c;
  c.raw_json = json_text;
  if (auto it = j.find("_name_or_path"); it != j.end() && it->is_string())
    c.name_or_path = it->get<std::string>();
  c.model_type = r.str_or("model_type", "");
  MDL_CHECK(!c.model_type.empty(), "[config] '", source, "' is missing required field 'model_type'");
  c.arch = parse_arch(c.model_type);
  if (r.has("architectures")) {
    MDL_CHECK(
        j["architectures"].is_array() && !j["architectures"].empty() && j["architectures"][0].is_string(),
        "[config] '", source, "': 'architectures' must be a non-empty array of strings");
    c.architecture = j["architectures"][0].get<std::string>();
  } else {
    c.architecture = architecture_name(c.arch, c.is_decoder() ? HeadKind::causal_lm : HeadKind::none);
  }
  c.head = head_from_architecture(c.architecture);
  c.initializer_range = r.num_or("initializer_range", 0.02, 0.0, 1e3);

  switch (c.arch) {
    case Arch::gpt2:
      c.vocab_size = r.required_int("vocab_size", kMaxVocab);
      c.hidden_size = r.required_int("n_embd", kMaxHidden);
      c.n_layer = r.required_int("n_layer", kMaxLayers);
      c.n_head = r.required_int("n_head", kMaxHeads);
      c.n_kv_head = c.n_head;
      c.intermediate_size = r.int_or("n_inner", 4 * c.hidden_size, 1, kMaxIntermediate);
      c.max_position = r.int_or("n_positions", 1024, 1, kMaxPositions);
      c.norm_eps = r.num_or("layer_norm_epsilon", 1e-5, 0.0, 1.0);
      c.activation = r.str_or("activation_function", "gelu_new");
      c.tie_word_embeddings = r.bool_or("tie_word_embeddings", true);
      c.qkv_bias = c.o_bias = c.mlp_bias = true;
      c.bos_token_id = r.int_or("bos_token_id", 50256);
      break;
    case Arch::llama: {
      c.vocab_size = r.required_int("vocab_size", kMaxVocab);
      c.hidden_size = r.required_int("hidden_size", kMaxHidden);
      c.intermediate_size = r.required_int("intermediate_size", kMaxIntermediate);
      c.n_layer = r.required_int("num_hidden_layers", kMaxLayers);
      c.n_head = r.required_int("num_attention_heads", kMaxHeads);
      c.n_kv_head = r.int_or("num_key_value_heads", c.n_head, 1, c.n_head);
      c.max_position = r.int_or("max_position_embeddings", 2048, 1, kMaxPositions);
      c.norm_eps = r.num_or("rms_norm_eps", 1e-6, 0.0, 1.0);
      c.rope_theta = r.num_or("rope_theta", 10000.0, 1e-6, 1e12);
      c.activation = r.str_or("hidden_act", "silu");
      c.tie_word_embeddings = r.bool_or("tie_word_embeddings", false);
      const bool qwen2 = c.model_type == "qwen2";
      c.qkv_bias = qwen2 ? true : r.bool_or("attention_bias", false);
      c.o_bias = qwen2 ? false : c.qkv_bias;
      c.mlp_bias = r.bool_or("mlp_bias", false);
      if (c.model_type == "mistral" || c.model_type == "mixtral" ||
          (qwen2 && r.bool_or("use_sliding_window", false)))
        c.sliding_window = r.int_or("sliding_window", 0, 0, kMaxPositions);
      if (c.model_type == "mixtral") read_experts(r, c);
      MDL_CHECK(!r.has("rope_scaling"), "[config] '", source, "': field 'rope_scaling' (",
                j["rope_scaling"].dump(),
                ") is not supported yet; remove it only if the checkpoint was trained without it");
      c.bos_token_id = r.int_or("bos_token_id", 1);
      break;
    }
    case Arch::bert:
      c.vocab_size = r.required_int("vocab_size", kMaxVocab);
      c.hidden_size = r.required_int("hidden_size", kMaxHidden);
      c.intermediate_size = r.required_int("intermediate_size", kMaxIntermediate);
      c.n_layer = r.required_int("num_hidden_layers", kMaxLayers);
      c.n_head = r.required_int("num_attention_heads", kMaxHeads);
      c.n_kv_head = c.n_head;
      c.max_position = r.int_or("max_position_embeddings", 512, 1, kMaxPositions);
      c.type_vocab_size = r.int_or("type_vocab_size", 2, 0, 1024);
      c.norm_eps = r.num_or("layer_norm_eps", 1e-12, 0.0, 1.0);
      c.activation = r.str_or("hidden_act", "gelu");
      c.qkv_bias = c.o_bias = c.mlp_bias = true;
      c.pad_token_id = r.int_or("pad_token_id", 0);
      break;
    case Arch::vit:
      c.hidden_size = r.required_int("hidden_size", kMaxHidden);
      c.intermediate_size = r.required_int("intermediate_size", kMaxIntermediate);
      c.n_layer = r.required_int("num_hidden_layers", kMaxLayers);
      c.n_head = r.required_int("num_attention_heads", kMaxHeads);
      c.n_kv_head = c.n_head;
      c.image_size = r.int_or("image_size", 224, 1, 1 << 14);
      c.patch_size = r.int_or("patch_size", 16, 1, 1 << 14);
      c.num_channels = r.int_or("num_channels", 3, 1, 64);
      MDL_CHECK(c.patch_size > 0 && c.image_size % c.patch_size == 0, "[config] '", source, "': image_size ",
                c.image_size, " must be a multiple of patch_size ", c.patch_size);
      c.max_position = c.num_patches() + 1;
      c.norm_eps = r.num_or("layer_norm_eps", 1e-12, 0.0, 1.0);
      c.activation = r.str_or("hidden_act", "gelu");
      c.qkv_bias = r.bool_or("qkv_bias", true);
      c.o_bias = c.mlp_bias = true;
      if (r.has("num_local_experts"))
        read_experts(r, c);  // mdl's upcycled ViT: every MLP a mixture of experts
      break;
    case Arch::moduleformer:
      read_moduleformer(r, c);
      break;
  }
  c.head_dim = c.arch == Arch::moduleformer
                   ? c.att_hidden / c.n_head
                   : r.int_or("head_dim", std::max<int64_t>(c.hidden_size / c.n_head, 1), 1, 4096);
  MDL_CHECK(c.arch == Arch::llama || c.arch == Arch::moduleformer || c.hidden_size % c.n_head == 0,
            "[config] '", source, "': hidden size ", c.hidden_size,
            " is not divisible by the number of heads ", c.n_head);
  MDL_CHECK(c.n_kv_head > 0 && c.n_head % c.n_kv_head == 0, "[config] '", source, "': ", c.n_head,
            " attention heads are not a multiple of ", c.n_kv_head, " key/value heads");
  if (c.is_decoder() && r.has("pad_token_id")) c.pad_token_id = r.int_or("pad_token_id", -1);
  if (r.has("eos_token_id")) {
    if (j["eos_token_id"].is_array()) {
      for (const auto& v : j["eos_token_id"]) c.eos_token_ids.push_back(v.get<int64_t>());
    } else {
      c.eos_token_ids.push_back(r.int_or("eos_token_id", -1));
    }
  } else if (c.arch == Arch::gpt2 || c.arch == Arch::moduleformer) {
    c.eos_token_ids.push_back(50256);
  } else if (c.arch == Arch::llama) {
    c.eos_token_ids.push_back(2);
  }
  if (r.has("id2label")) {
    MDL_CHECK(j["id2label"].is_object(), "[config] '", source, "': 'id2label' must be an object");
    c.num_labels = static_cast<int64_t>(j["id2label"].size());
  }
  c.num_labels = r.int_or("num_labels", c.num_labels > 0 ? c.num_labels : 2, 1, 1 << 20);
  const std::string act = c.activation;
  MDL_CHECK(act == "gelu" || act == "gelu_new" || act == "gelu_pytorch_tanh" || act == "gelu_fast" ||
                act == "silu" || act == "swish" || act == "relu",
            "[config] '", source, "': activation '", act,
            "' is not supported; expected gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, silu or relu");
  return c;
}

ModelConfig load_model_config(const std::string& path) {
  namespace fs = std::filesystem;
  std::string file = fs::is_directory(path) ? (fs::path(path) / "config.json").string() : path;
  MDL_CHECK(fs::exists(file), "[config] '", file, "' does not exist; is '", path,
            "' a Hugging Face checkpoint directory?");
  return parse_model_config(io::read_text(file, io::kMaxJsonFileBytes), file);
}

std::string model_config_to_json(const ModelConfig& c) {
  json j = c.raw_json.empty() ? json::object() : json::parse(c.raw_json);
  j["model_type"] = c.model_type.empty() ? arch_name(c.arch) : c.model_type;
  j["architectures"] = {c.architecture.empty() ? architecture_name(c.arch, c.head) : c.architecture};
  j["vocab_size"] = c.vocab_size;
  j["initializer_range"] = c.initializer_range;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  switch (c.arch) {
    case Arch::gpt2:
      j["n_embd"] = c.hidden_size;
      j["n_layer"] = c.n_layer;
      j["n_head"] = c.n_head;
      j["n_inner"] = c.intermediate_size;
      j["n_positions"] = c.max_position;
      j["n_ctx"] = c.max_position;
      j["layer_norm_epsilon"] = c.norm_eps;
      j["activation_function"] = c.activation;
      break;
    case Arch::llama:
      j["hidden_size"] = c.hidden_size;
      j["intermediate_size"] = c.intermediate_size;
      j["num_hidden_layers"] = c.n_layer;
      j["num_attention_heads"] = c.n_head;
      j["num_key_value_heads"] = c.n_kv_head;
      j["head_dim"] = c.head_dim;
      j["max_position_embeddings"] = c.max_position;
      j["rms_norm_eps"] = c.norm_eps;
      j["rope_theta"] = c.rope_theta;
      j["hidden_act"] = c.activation;
      if (c.model_type != "qwen2") j["attention_bias"] = c.qkv_bias;
      j["mlp_bias"] = c.mlp_bias;
      if (c.sliding_window > 0) j["sliding_window"] = c.sliding_window;
      if (c.num_experts > 0) {
        j["num_local_experts"] = c.num_experts;
        j["num_experts_per_tok"] = c.experts_per_token;
        j["router_aux_loss_coef"] = c.router_aux_loss_coef;
        j["output_router_logits"] = false;
        if (!c.router_json.empty())
          j["mdl_router"] = json::parse(c.router_json);
        else
          j.erase("mdl_router");
      }
      break;
    case Arch::bert:
      j["hidden_size"] = c.hidden_size;
      j["intermediate_size"] = c.intermediate_size;
      j["num_hidden_layers"] = c.n_layer;
      j["num_attention_heads"] = c.n_head;
      j["max_position_embeddings"] = c.max_position;
      j["type_vocab_size"] = c.type_vocab_size;
      j["layer_norm_eps"] = c.norm_eps;
      j["hidden_act"] = c.activation;
      break;
    case Arch::vit:
      j.erase("vocab_size");
      j["hidden_size"] = c.hidden_size;
      j["intermediate_size"] = c.intermediate_size;
      j["num_hidden_layers"] = c.n_layer;
      j["num_attention_heads"] = c.n_head;
      j["image_size"] = c.image_size;
      j["patch_size"] = c.patch_size;
      j["num_channels"] = c.num_channels;
      j["layer_norm_eps"] = c.norm_eps;
      j["hidden_act"] = c.activation;
      j["qkv_bias"] = c.qkv_bias;
      if (c.num_experts > 0) {
        j["num_local_experts"] = c.num_experts;
        j["num_experts_per_tok"] = c.experts_per_token;
        j["router_aux_loss_coef"] = c.router_aux_loss_coef;
        if (!c.router_json.empty())
          j["mdl_router"] = json::parse(c.router_json);
        else
          j.erase("mdl_router");
      }
      break;
    case Arch::moduleformer: {
      j["n_embd"] = c.hidden_size;
      j["n_layer"] = c.n_layer;
      j["n_head"] = c.n_head;
      j["att_hidden"] = c.att_hidden;
      j["ffd_hidden"] = c.intermediate_size;
      j["n_att_experts"] = c.num_att_experts;
      j["k_att"] = c.att_experts_per_token;
      j["n_mlp_experts"] = c.num_experts;
      j["k_mlp"] = c.experts_per_token;
      j["gating_size"] = c.gating_size;
      j["gate_type"] = c.gate_type;
      j["aux_loss_type"] = c.aux_loss_type;
      j["aux_loss_weight"] = c.router_aux_loss_coef;
      j["sample_topk"] = c.sample_topk;
      const int64_t history = j.value("history_length", c.max_position / 2);
      j["history_length"] = std::min(history, c.max_position - 1);
      j["block_size"] = c.max_position - j["history_length"].get<int64_t>();
      j["layer_norm_epsilon"] = c.norm_eps;
      j["activation_function"] = c.activation;
      if (!c.router_json.empty())
        j["mdl_router"] = json::parse(c.router_json);
      else
        j.erase("mdl_router");
      break;
    }
  }
  if (c.pad_token_id >= 0) j["pad_token_id"] = c.pad_token_id;
  if (c.bos_token_id >= 0) j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_ids.size() == 1) j["eos_token_id"] = c.eos_token_ids[0];
  if (c.eos_token_ids.size() > 1) j["eos_token_id"] = c.eos_token_ids;
  if (c.head == HeadKind::sequence_classification || c.head == HeadKind::token_classification) {
    json id2label = json::object(), label2id = json::object();
    for (int64_t i = 0; i < c.num_labels; ++i) {
      id2label[std::to_string(i)] = "LABEL_" + std::to_string(i);
      label2id["LABEL_" + std::to_string(i)] = i;
    }
    if (!j.contains("id2label") || j["id2label"].size() != static_cast<size_t>(c.num_labels)) {
      j["id2label"] = id2label;
      j["label2id"] = label2id;
    }
  }
  return j.dump(2) + "\n";
}

}  // namespace mdl
