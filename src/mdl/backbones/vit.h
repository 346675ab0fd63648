// Vision Transformer backbone (ViTModel, ViTForImageClassification), composed from the shared layers
// under Hugging Face's module names.
#pragma once

#include "mdl/backbones/model.h"

namespace mdl {

/// A ViT model (zero weights) for `config`, with the head its architecture names.
Model create_vit(const ModelConfig& config);

}  // namespace mdl
