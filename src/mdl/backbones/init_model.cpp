#include "mdl/backbones/init_model.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "mdl/backbones/model.h"
#include "mdl/core/error.h"
#include "mdl/io/atomic_file.h"
#include "mdl/tokenizers/tokenizer.h"
#include "mdl/tokenizers/trainer.h"

namespace fs = std::filesystem;

namespace mdl {

const std::vector<std::string>& builtin_corpus() {
  static const std::vector<std::string> corpus = {
      "Modular deep learning builds models from parts that can be trained, shared and combined.",
      "A frozen backbone computes most of the function; small modules specialise it for a task.",
      "The router decides which modules an input uses, and the aggregator combines their outputs.",
      "Adapters, low-rank updates and prompts are parameter-efficient ways to add what a task needs.",
      "The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the sun all day.",
      "Once upon a time there was a small model that learned to read, to write and to count: 1, 2, 3.",
      "In the morning the market opens; in the evening the traders go home and the streets are quiet.",
      "Die Katze schläft auf dem Sofa. El perro corre en el parque. Il gatto dorme sul divano.",
      "Questions end with a question mark? Statements end with a full stop. Exclamations end with a bang!",
      "Language models predict the next token; classifiers predict a label for the whole sequence.",
      "She said that the weather would be fine tomorrow, so they planned a walk along the river.",
      "Numbers like 42, 3.14 and 1000 appear in text, and so do names like Ada, Alan and Grace.",
  };
  return corpus;
}

HeadKind parse_head(const std::string& name) {
  if (name == "causal_lm") return HeadKind::causal_lm;
  if (name == "sequence_classification" || name == "sequence") return HeadKind::sequence_classification;
  if (name == "token_classification" || name == "token") return HeadKind::token_classification;
  if (name == "none") return HeadKind::none;
  MDL_FAIL("[init-model] unknown head '", name,
           "'; expected causal_lm, sequence_classification, token_classification or none");
}

ModelConfig preset_config(const std::string& arch_name_in, const std::string& preset, int64_t vocab_size,
                          HeadKind head, int64_t num_labels) {
  MDL_CHECK(preset == "tiny" || preset == "small", "[init-model] unknown preset '", preset,
            "'; expected tiny or small");
  const bool tiny = preset == "tiny";
  ModelConfig c;
  c.arch = parse_arch(arch_name_in);
  c.model_type = arch_name_in;
  c.head = head;
  c.architecture = architecture_name(c.arch, head);
  if (arch_name_in == "mistral" && head == HeadKind::causal_lm) c.architecture = "MistralForCausalLM";
  if (arch_name_in == "qwen2" && head == HeadKind::causal_lm) c.architecture = "Qwen2ForCausalLM";
  if (arch_name_in == "mixtral" && head == HeadKind::causal_lm) c.architecture = "MixtralForCausalLM";
  c.vocab_size = vocab_size;
  c.num_labels = num_labels;
  c.hidden_size = tiny ? 64 : 384;
  c.n_layer = tiny ? 2 : 6;
  c.n_head = tiny ? 4 : 6;
  c.n_kv_head = c.n_head;
  c.head_dim = c.hidden_size / c.n_head;
  c.max_position = tiny ? 256 : 512;
  switch (c.arch) {
    case Arch::gpt2:
      c.intermediate_size = 4 * c.hidden_size;
      c.norm_eps = 1e-5;
      c.activation = "gelu_new";
      c.tie_word_embeddings = true;
      c.qkv_bias = c.o_bias = c.mlp_bias = true;
      break;
    case Arch::llama:
      c.n_kv_head = tiny ? 2 : 2;
      c.intermediate_size = tiny ? 128 : 1024;
      c.norm_eps = 1e-6;
      c.rope_theta = 10000.0;
      c.activation = "silu";
      c.tie_word_embeddings = arch_name_in == "qwen2";
      c.qkv_bias = arch_name_in == "qwen2";
      if (arch_name_in == "mistral") c.sliding_window = c.max_position / 4;
      if (arch_name_in == "mixtral") {  // top-2 of 8 experts, each a quarter of the dense MLP's width
        c.num_experts = 8;
        c.experts_per_token = 2;
        c.intermediate_size /= 4;
        c.router_aux_loss_coef = 0.02;
      }
      break;
    case Arch::vit:
      MDL_FAIL("[init-model] ViTs read images, not text; create one with create_model (the demo does)");
    case Arch::moduleformer:  // MoLM's shape, scaled: 8 (tiny) or 16 attention and MLP experts, top-2
      c.architecture = head == HeadKind::causal_lm ? "ModuleFormerForCausalLM" : c.architecture;
      c.att_hidden = tiny ? 32 : 256;
      c.n_head = tiny ? 2 : 4;
      c.n_kv_head = c.n_head;
      c.head_dim = c.att_hidden / c.n_head;
      c.num_att_experts = c.num_experts = tiny ? 8 : 16;
      c.att_experts_per_token = c.experts_per_token = 2;
      c.intermediate_size = tiny ? 64 : 512;
      c.gating_size = tiny ? 32 : 256;
      c.gate_type = "mlp";
      c.aux_loss_type = "mi";
      c.router_aux_loss_coef = 0.01;
      c.norm_eps = 1e-5;
      c.activation = "gelu_new";
      break;
    case Arch::bert:
      c.intermediate_size = 4 * c.hidden_size;
      c.norm_eps = 1e-12;
      c.activation = "gelu";
      c.type_vocab_size = 2;
      c.qkv_bias = c.o_bias = c.mlp_bias = true;
      break;
  }
  return c;
}

InitModelResult init_model(const InitModelOptions& options, const std::string& out_dir) {
  const Arch arch = parse_arch(options.arch);
  const HeadKind head = options.head.empty()
                            ? (arch == Arch::bert ? HeadKind::sequence_classification : HeadKind::causal_lm)
                            : parse_head(options.head);
  MDL_CHECK(
      !(arch == Arch::bert && head == HeadKind::causal_lm),
      "[init-model] BERT is an encoder; use --head sequence_classification, token_classification or none");
  MDL_CHECK(options.preset == "tiny" || options.preset == "small", "[init-model] unknown preset '",
            options.preset, "'; expected tiny or small");

  // Tokenizer first: the model's vocabulary follows it.
  std::vector<std::string> texts;
  for (const auto& file : options.corpus_files) {
    std::ifstream in(file);
    MDL_CHECK(in.good(), "[init-model] cannot read corpus file '", file, "'");
    std::string line;
    while (std::getline(in, line))
      if (!line.empty()) texts.push_back(line);
  }
  if (texts.empty()) texts = builtin_corpus();
  TrainerOptions trainer;
  trainer.kind = arch == Arch::gpt2 || arch == Arch::moduleformer ? TokenizerKind::byte_level_bpe
                 : arch == Arch::llama                            ? TokenizerKind::metaspace_bpe
                                                                  : TokenizerKind::wordpiece;
  trainer.vocab_size = options.vocab_size > 0 ? options.vocab_size : (options.preset == "tiny" ? 512 : 8192);
  const std::string tokenizer_json = train_tokenizer(texts, trainer);
  Tokenizer tokenizer = Tokenizer::from_json(tokenizer_json, "trained tokenizer");
  const int64_t tok_vocab = tokenizer.vocab_size();
  const int64_t model_vocab =
      std::max<int64_t>((tok_vocab + 63) / 64 * 64, options.preset == "small" ? 8192 : 0);

  ModelConfig config = preset_config(options.arch, options.preset, model_vocab, head, options.num_labels);
  MDL_CHECK(options.layers >= 0 && options.hidden_size >= 0, "[init-model] layers and hidden size must be ",
            "positive (0: the preset's), got ", options.layers, " and ", options.hidden_size);
  if (options.layers > 0) config.n_layer = options.layers;
  if (options.hidden_size > 0) {
    MDL_CHECK(arch != Arch::moduleformer,
              "[init-model] a ModuleFormer's width is set by its experts' sizes; ",
              "--hidden applies to the other architectures");
    MDL_CHECK(options.hidden_size % config.n_head == 0, "[init-model] hidden size ", options.hidden_size,
              " is not a multiple of the preset's ", config.n_head, " heads");
    config.hidden_size = options.hidden_size;
    config.head_dim = options.hidden_size / config.n_head;
  }
  const SpecialTokens special = special_tokens_of(trainer.kind);
  if (!special.bos.empty()) config.bos_token_id = *tokenizer.token_to_id(special.bos);
  config.eos_token_ids.clear();
  if (arch != Arch::bert) config.eos_token_ids.push_back(*tokenizer.token_to_id(special.eos));
  if (!special.pad.empty()) config.pad_token_id = *tokenizer.token_to_id(special.pad);
  config.raw_json = model_config_to_json(config);
  config = parse_model_config(config.raw_json, "generated config");  // the same path every loader takes

  Model model = create_model(config);
  model->init_weights(options.seed);
  // The whole directory or nothing: over an existing checkpoint, a failure leaves that one as it was.
  io::AtomicDirectory out(out_dir);
  save_model(*model, out.path(), options.max_shard_bytes);
  io::write_text_atomic((fs::path(out.path()) / "tokenizer.json").string(), tokenizer_json);
  nlohmann::json tc = {
      {"tokenizer_class", arch == Arch::gpt2 || arch == Arch::moduleformer ? "GPT2TokenizerFast"
                          : arch == Arch::llama                            ? "LlamaTokenizerFast"
                                                                           : "BertTokenizerFast"},
      {"model_max_length", config.max_position},
      {"clean_up_tokenization_spaces", false}};
  if (!special.bos.empty()) tc["bos_token"] = special.bos;
  if (!special.eos.empty()) tc["eos_token"] = special.eos;
  if (!special.unk.empty()) tc["unk_token"] = special.unk;
  if (!special.pad.empty()) tc["pad_token"] = special.pad;
  if (arch == Arch::llama) tc["add_bos_token"] = true, tc["add_eos_token"] = false;
  if (arch == Arch::bert)
    tc["do_lower_case"] = true, tc["cls_token"] = "[CLS]", tc["sep_token"] = "[SEP]",
    tc["mask_token"] = "[MASK]";
  io::write_text_atomic((fs::path(out.path()) / "tokenizer_config.json").string(), tc.dump(2) + "\n");
  out.commit();
  return {config, model->num_parameters(), tok_vocab};
}

}  // namespace mdl
