// Vision Transformer backbone (ViTModel, ViTForImageClassification), composed from the shared layers
// under Hugging Face's module names.
#pragma once

#include "mdl/backbones/model.h"

namespace mdl {

/// A ViT model (zero weights) for `config`, with the head its architecture names.
Model create_vit(const ModelConfig& config);
/// ViT's default PEFT targets.
ArchTargets vit_targets();

}  // namespace mdl
