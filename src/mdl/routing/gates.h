// Gates: the learned scores a router turns into a routing, from the rows it routes (N, C) to logits
// (N, E). ModuleFormer's three (IBM's `top_k_gating`):
//   linear  W x (+ b)
//   mlp     W2 gelu(W1 x + b1), hidden 256 by default, W2 without bias
//   gmm     cos(W x, c_e) * exp(tau): the cosine to each expert's centroid c_e (N(0, 1) at the start) in a
//           projected space, sharpened by a learned temperature (tau = 0 at the start)
// A gate is a torch module: its parameters train with whatever holds it, under the names IBM's
// `top_k_gating` gives them, so a ModuleFormer checkpoint's gates load by name:
//   linear  w_gate.0.weight (E, C) [w_gate.0.bias (E)]
//   mlp     w_gate.0.weight (H, C), w_gate.0.bias (H), w_gate.3.weight (E, H)
//   gmm     w_gate.weight (H, C), expert_centroids (E, H), temperature (1)
// Pass `gate.scores` to a LearnedRouter as its scores.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <memory>
#include <string>
#include <vector>

namespace mdl {

/// Gate settings.
struct GateOptions {
  std::string kind = "linear";  ///< linear | mlp | gmm
  int64_t hidden = 256;         ///< mlp: hidden width; gmm: the projected space's width
  bool bias = false;            ///< linear: a bias on the logits (IBM's linear gate has none)
};

/// Scores of rows over experts.
class GateImpl : public torch::nn::Module {
 public:
  /// A gate from `in` features to `experts` logits; weights drawn from `seed` (N(0, 0.02), as IBM's init).
  GateImpl(const GateOptions& options, int64_t in, int64_t experts, uint64_t seed, c10::TensorOptions dtype);
  /// Logits (N, E) for rows (N, C).
  at::Tensor scores(const at::Tensor& rows) const;
  const GateOptions& options() const { return options_; }
  /// The rows of the parameters that score each expert, by name (linear: "w_gate.0.weight" and its bias;
  /// mlp: "w_gate.3.weight"; gmm: "expert_centroids"): what adding or pruning experts extends or selects.
  static std::vector<std::string> expert_rows(const std::string& kind, bool bias);

 private:
  GateOptions options_;
  at::Tensor weight, bias;           // linear (E, C), (E)
  at::Tensor fc1_w, fc1_b, fc2_w;    // mlp (H, C), (H), (E, H)
  at::Tensor proj, centroids, temp;  // gmm (H, C), (E, H), (1)
};
TORCH_MODULE(Gate);

}  // namespace mdl
