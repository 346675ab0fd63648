// AdapterHub (`adapters` library) directories: `adapter_config.json` ({"config": {...}, "name", "model_type",
// "hidden_size", ...}) + `adapter.safetensors`, keys with the adapter's name:
//   bottleneck: <layer>.attention_adapters|output_adapters.adapters.<name>.adapter_down.0.weight (Llama,
//   GPT-2),
//               bert.encoder.layer.N.attention.output|output.adapters.<name>...                  (BERT)
//   LoRA:       <module>.loras.<name>.lora_A (r, in), .lora_B (out, r)
// Read and written: bottleneck adapters whose residual and norms match mdl's (original_ln_before false, as in
// Houlsby's `double_seq_bn`; parallel adapters on post-norm BERT) and additive LoRA on separate projections.
// Other variants are refused with the reason.
#pragma once

#include <string>

#include "mdl/modules/peft_format.h"

namespace mdl {

/// True if `dir` holds an AdapterHub adapter (adapter_config.json with a "config" object).
bool is_adapterhub_dir(const std::string& dir);

/// Reads an AdapterHub directory for `model` (same shape as a PEFT read: config, sites, tensors).
PeftModule read_adapterhub(const std::string& dir, const ModelImpl& model);

/// Writes module `name` (a bottleneck adapter or a LoRA) as an AdapterHub directory.
void write_adapterhub(const ModuleSet& set, const std::string& name, const std::string& dir);

}  // namespace mdl
