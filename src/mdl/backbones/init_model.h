// `mdl init-model`: a randomly initialised checkpoint in the exact Hugging Face layout (config.json,
// model.safetensors, tokenizer.json, tokenizer_config.json), with a tokenizer trained on a corpus.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "mdl/io/model_config.h"

namespace mdl {

/// What to create.
struct InitModelOptions {
  std::string arch = "gpt2";    ///< gpt2 | llama | mistral | qwen2 | mixtral | bert | moduleformer
  std::string preset = "tiny";  ///< tiny (milliseconds) | small (~10-30M parameters)
  uint64_t seed = 0;            ///< weight initialisation seed
  std::string head;             ///< causal_lm | sequence_classification | token_classification | none;
                                ///< empty: causal_lm for decoders, sequence_classification for BERT
  int64_t num_labels = 2;       ///< classification heads
  std::vector<std::string> corpus_files;  ///< text to train the tokenizer on; empty: a built-in sample
  int64_t vocab_size = 0;                 ///< tokenizer target size; 0: the preset's
  int64_t max_shard_bytes = 0;            ///< > 0: write sharded safetensors with an index
  int64_t layers = 0;                     ///< blocks; 0: the preset's
  int64_t hidden_size = 0;                ///< model width (a multiple of the preset's heads); 0: the preset's
};

/// The hyper-parameters of a preset for an architecture, with the given vocabulary size and head.
ModelConfig preset_config(const std::string& arch, const std::string& preset, int64_t vocab_size,
                          HeadKind head, int64_t num_labels);

/// Parses a head name (see InitModelOptions::head).
HeadKind parse_head(const std::string& name);

/// Summary of what init_model wrote.
struct InitModelResult {
  ModelConfig config;
  int64_t parameters = 0;
  int64_t tokenizer_vocab = 0;
};

/// Creates the checkpoint directory `out_dir` (files written atomically).
InitModelResult init_model(const InitModelOptions& options, const std::string& out_dir);

/// The built-in sample text used when no corpus is given.
const std::vector<std::string>& builtin_corpus();

}  // namespace mdl
