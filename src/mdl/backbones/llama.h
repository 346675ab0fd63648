// Llama backbone, composed from the shared layers under Hugging Face's module names.
#pragma once

#include "mdl/backbones/model.h"

namespace mdl {

/// A Llama model (zero weights) for `config`, with the head its architecture names.
Model create_llama(const ModelConfig& config);
/// Llama's default PEFT targets.
ArchTargets llama_targets();

}  // namespace mdl
