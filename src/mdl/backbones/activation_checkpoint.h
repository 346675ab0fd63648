// Activation (gradient) checkpointing, as Hugging Face's gradient_checkpointing_enable: a layer run
// through `checkpointed` keeps only its input for backward instead of every intermediate, and runs again
// during backward to backpropagate. Activation memory goes from all layers' intermediates to one layer's
// plus each layer's input; the price is one more forward of the layers (~1/3 more compute).
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>

namespace mdl {

/// A layer (or several) as a function of its input hidden states (B, T, C).
using LayerFn = std::function<at::Tensor(const at::Tensor&)>;

/// Runs `layer` on x without keeping its intermediates. Backward runs it again with the same random
/// numbers (dropout), the same autocast precision and the same forward context (routing choices and
/// token ids, copied), then
/// backpropagates through the rerun, which accumulates the gradients of the parameters used inside and
/// returns x's. So `layer` must capture by value what it reads besides x and parameters (it runs again
/// after its caller returned) and may not need the gradient of any other tensor. A router that records
/// into the forward's routing log inside `layer` is refused: its auxiliary loss would have no gradient.
at::Tensor checkpointed(const LayerFn& layer, const at::Tensor& x);

}  // namespace mdl
