// Hugging Face `config.json` parsed into typed hyper-parameters. Fields keep their HF names on disk;
// unknown fields are kept verbatim and written back.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mdl {

/// Architecture families; `llama` also covers Mistral, Qwen2 and Mixtral (a Llama with MoE MLPs) checkpoints;
/// `vit` is the Vision Transformer (images in, no tokens); `moduleformer` is IBM's ModuleFormer (MoLM):
/// mixtures of attention and MLP experts with stick-breaking attention.
enum class Arch { gpt2, llama, bert, vit, moduleformer };

/// What sits on top of the backbone's hidden states.
enum class HeadKind { none, causal_lm, sequence_classification, token_classification };

/// Fixed model hyper-parameters (llama.cpp's hparams): what a checkpoint is, not how it is run.
struct ModelConfig {
  Arch arch = Arch::llama;
  std::string model_type;    ///< "gpt2", "llama", "mistral", "qwen2", "mixtral", "bert", "vit"
  std::string architecture;  ///< architectures[0], e.g. "LlamaForCausalLM"
  HeadKind head = HeadKind::causal_lm;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t n_layer = 0;
  int64_t n_head = 0;
  int64_t n_kv_head = 0;  ///< grouped-query attention; == n_head for multi-head attention
  int64_t head_dim = 0;
  int64_t intermediate_size = 0;
  int64_t max_position = 0;
  double norm_eps = 1e-5;
  double rope_theta = 10000.0;  ///< llama family only
  int64_t sliding_window = 0;   ///< Mistral; 0 = none
  bool tie_word_embeddings = false;
  bool qkv_bias = false;  ///< Qwen2 and GPT-2/BERT have q/k/v biases
  bool o_bias = false;
  bool mlp_bias = false;
  std::string activation;       ///< "gelu", "gelu_new", "silu", "relu"
  int64_t type_vocab_size = 0;  ///< BERT token types
  int64_t num_labels = 0;       ///< classification heads
  int64_t pad_token_id = -1;
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;
  double initializer_range = 0.02;
  int64_t image_size = 0;    ///< ViT: images are image_size x image_size
  int64_t patch_size = 0;    ///< ViT: square patches, each one token
  int64_t num_channels = 0;  ///< ViT: image channels
  int64_t num_experts = 0;   ///< Mixtral `num_local_experts` (also an upcycled ViT's): > 0 makes every MLP a
                             ///< sparse mixture of experts
  int64_t experts_per_token = 2;      ///< Mixtral `num_experts_per_tok` (top-k, weights renormalised)
  double router_aux_loss_coef = 0.0;  ///< Mixtral's load-balancing loss weight in training
  std::string router_json;            ///< mdl's `mdl_router` field: RouterOptions replacing the top-k default
                                      ///< (upcycled, MoEfied)
  // ModuleFormer: the MLP experts are num_experts (n_mlp_experts) of intermediate_size (ffd_hidden), top
  // experts_per_token (k_mlp); router_aux_loss_coef is its aux_loss_weight.
  int64_t att_hidden = 0;             ///< width A of the attention experts' queries (n_head x head size)
  int64_t num_att_experts = 0;        ///< n_att_experts
  int64_t att_experts_per_token = 2;  ///< k_att
  int64_t gating_size = 256;          ///< hidden width of the mlp and gmm gates
  std::string gate_type = "mlp";      ///< linear | mlp | gmm
  std::string aux_loss_type = "mi";   ///< mi | switch: the routers' auxiliary loss
  int64_t sample_topk = 0;            ///< of the k experts, this many drawn in training
  std::string raw_json;               ///< the original file, unknown fields included
  /// Where the model came from: the checkpoint directory load_model read (else config.json's
  /// "_name_or_path"); what module files name as their base (PEFT's base_model_name_or_path). Not written.
  std::string name_or_path;
  /// name_or_path, or the model type when it is unknown.
  const std::string& base_name() const { return name_or_path.empty() ? model_type : name_or_path; }

  /// Body prefix of the full model's tensor names: "transformer", "model", "bert" or "vit".
  std::string body_prefix() const;
  bool is_decoder() const { return arch == Arch::gpt2 || arch == Arch::llama || arch == Arch::moduleformer; }
  /// ViT: patches per image (the sequence is these plus the [CLS] token).
  int64_t num_patches() const {
    return patch_size > 0 ? (image_size / patch_size) * (image_size / patch_size) : 0;
  }
};

/// Parses config.json text; `source` names the file in errors. A missing required field is an error
/// naming it.
ModelConfig parse_model_config(const std::string& json_text, const std::string& source = "config.json");

/// Reads `DIR/config.json` (or a config file path).
ModelConfig load_model_config(const std::string& path);

/// Serialises to HF's config.json layout, keeping unknown fields of `raw_json`.
std::string model_config_to_json(const ModelConfig& config);

/// The HF architecture class name for a family and head, e.g. (llama, causal_lm) -> "LlamaForCausalLM".
std::string architecture_name(Arch arch, HeadKind head);

/// Parses "gpt2|llama|mistral|qwen2|mixtral|bert|vit|moduleformer".
Arch parse_arch(const std::string& name);
std::string arch_name(Arch arch);
std::string head_name(HeadKind head);

}  // namespace mdl
