// Rebuilding a tensor in backward instead of keeping it from the forward pass. A projection's backward
// needs its input x for the weight's gradient (and LoRA's dA, dB). When x is the output of an op that
// keeps, for its own backward, what computes x again (RMSNorm keeps its input and 1/rms, SwiGLU its gate
// and up), the projection's node keeps a Rebuild instead of x, and x is freed after the forward pass. The
// op's own backward runs after every consumer's (autograd's order), so what a Rebuild reads is still
// there. On the small Llama at batch 8 x 128 that is the two norms' outputs and SwiGLU's output: 7 of 25
// MiB of activations per layer, for a few element-wise passes in backward.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <memory>
#include <typeinfo>

namespace torch::autograd {
struct Node;
struct AutogradContext;
}  // namespace torch::autograd

namespace mdl {

/// Computes a node's output 0 again from the tensors that node saved for its own backward.
using RebuildFn = at::Tensor (*)(torch::autograd::Node& producer);

/// Declares that nodes of dynamic type `node_type` (a torch::autograd::CppNode<F>) can rebuild their
/// output with `fn`. Called once by each such op (fused_ops.cpp).
void register_rebuild(const std::type_info& node_type, RebuildFn fn);

/// What a consumer keeps instead of an input: the producing node and how to run it again.
class Rebuild : public torch::CustomClassHolder {
 public:
  Rebuild(std::shared_ptr<torch::autograd::Node> producer, RebuildFn fn, std::vector<int64_t> sizes);
  /// The tensor again, with the sizes it had in the forward pass.
  at::Tensor operator()() const;

 private:
  std::shared_ptr<torch::autograd::Node> producer_;
  RebuildFn fn_;
  std::vector<int64_t> sizes_;
};

/// A Rebuild of `y` when y is, unchanged, the output of a registered op in the autograd graph (not a view
/// of it, not modified in place); null otherwise.
c10::intrusive_ptr<Rebuild> rebuild_of(const at::Tensor& y);

/// In a custom Function's forward: what to pass to save_for_backward for its input `x`. Either x itself,
/// or an undefined tensor while `ctx` keeps x's Rebuild. Once per node: it keeps one input's Rebuild.
at::Tensor save_input(torch::autograd::AutogradContext* ctx, const at::Tensor& x);

/// In its backward: the input again, from `saved` (what save_input returned, unpacked) or the Rebuild.
at::Tensor saved_input(torch::autograd::AutogradContext* ctx, const at::Tensor& saved);

}  // namespace mdl
