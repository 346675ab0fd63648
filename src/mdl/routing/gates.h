// Gates: the learned scores a router turns into a routing, from the rows it routes (N, C) to logits
// (N, E). ModuleFormer's three (IBM's `top_k_gating`):
//   linear  W x (+ b)
//   mlp     W2 gelu(W1 x + b1), hidden 256 by default, W2 without bias
//   gmm     cos(W x, c_e) * exp(tau): the cosine to each expert's centroid c_e (N(0, 1) at the start) in a
//           projected space, sharpened by a learned temperature (tau = 0 at the start)
// A gate is a torch module: its parameters train with whatever holds it (its names: "weight", "bias",
// "fc1_weight", "fc1_bias", "fc2_weight", "proj", "centroids", "temperature"). Pass `gate.scores` to a
// LearnedRouter as its scores.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <memory>
#include <string>

namespace mdl {

/// Gate settings.
struct GateOptions {
  std::string kind = "linear";  ///< linear | mlp | gmm
  int64_t hidden = 256;         ///< mlp: hidden width; gmm: the projected space's width
  bool bias = true;             ///< linear: a bias on the logits
};

/// Scores of rows over experts.
class GateImpl : public torch::nn::Module {
 public:
  /// A gate from `in` features to `experts` logits; weights drawn from `seed` (N(0, 0.02), as IBM's init).
  GateImpl(const GateOptions& options, int64_t in, int64_t experts, uint64_t seed, c10::TensorOptions dtype);
  /// Logits (N, E) for rows (N, C).
  at::Tensor scores(const at::Tensor& rows) const;
  const GateOptions& options() const { return options_; }

 private:
  GateOptions options_;
  at::Tensor weight, bias, fc1_w, fc1_b, fc2_w, proj, centroids, temperature;
};
TORCH_MODULE(Gate);

}  // namespace mdl
