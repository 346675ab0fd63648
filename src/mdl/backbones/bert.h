// BERT backbone, composed from the shared layers under Hugging Face's module names.
#pragma once

#include "mdl/backbones/model.h"

namespace mdl {

/// A BERT model (zero weights) for `config`, with the head its architecture names.
Model create_bert(const ModelConfig& config);
/// BERT's default PEFT targets.
ArchTargets bert_targets();

}  // namespace mdl
