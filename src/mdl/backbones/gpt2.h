// GPT-2 backbone, composed from the shared layers under Hugging Face's module names.
#pragma once

#include "mdl/backbones/model.h"

namespace mdl {

/// A GPT-2 model (zero weights) for `config`, with the head its architecture names.
Model create_gpt2(const ModelConfig& config);
/// GPT-2's default PEFT targets.
ArchTargets gpt2_targets();

}  // namespace mdl
