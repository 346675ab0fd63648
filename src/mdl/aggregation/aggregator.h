// Aggregators: how a group combines its members at a site (the survey's aggregation functions), the last
// of Algorithm 1's three steps inside a group (modules/module_group.h). Given the group router's routing,
// an aggregator computes the members it needs on the rows that need them and returns the group's change
// to the site's current output:
//   weighted sum       sum over each row's routed members of weight * change (mixtures of experts: LoRA,
//                      adapter or feed-forward experts; every member with weight 1 is plain parallel
//                      composition)
//   attention          AdapterFusion (Pfeiffer et al., 2021): q = Wq h, k_n = Wk o_n, v_n = Wv o_n,
//                      a = softmax_n(q . k_n / temperature), change = sum_n a_n v_n (h the current output,
//                      o_n member n's change; Wv starts as the identity)
//   gate               g_n = sigmoid(w_n . h + b_n), change = sum_n g_n o_n (w = 0, b = 0: half strength
//   each) parameter average  the members' LoRA factors averaged with each example's weights, then one
//   low-rank
//                      product per example (SMEAR, Polytropon; per head for MHR): parameter aggregation
// An aggregator's parameters are registered by the module that holds it, under the names it gives.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <functional>
#include <memory>
#include <string>

#include "mdl/routing/router.h"

namespace mdl {

/// A group's members as an aggregator sees them.
struct GroupMembers {
  int64_t count = 0;
  int64_t out_features = 0;  ///< width of a member's change
  /// Member e's change on some rows: input (n, ..., in), current output (n, ..., out; undefined when
  /// `reads_current` is false) -> change (n, ..., out).
  std::function<at::Tensor(int64_t e, const at::Tensor& input, const at::Tensor& current)> change;
  /// Whether a change depends on the current output (adapters: yes; LoRA and feed-forward experts: no), so
  /// that dispatch carries the current output to a member's rows only when it is read.
  bool reads_current = true;
  /// Every member's low-rank factors stacked, A (E, r, in) and B (E, out, r), with their common scaling:
  /// false when some member is not a LoRA or ranks or scalings differ (parameter averaging needs them).
  std::function<bool(at::Tensor& A, at::Tensor& B, double& scaling)> stacked_low_rank;
};

/// Combines a group's members.
class Aggregator {
 public:
  virtual ~Aggregator() = default;
  virtual std::string kind() const = 0;
  /// The group's change to `current` (B, T, out) from `input` (B, T, in) under `routing`, in the members'
  /// dtype. `current` may be undefined where nothing precedes the group (a backbone's expert MLP).
  virtual at::Tensor combine(const at::Tensor& input, const at::Tensor& current, const Routing& routing,
                             const GroupMembers& members) = 0;
  /// Registers this aggregator's parameters in `owner`.
  virtual void register_parameters(torch::nn::Module& owner) {}
  /// Whether it reads a routing (attention and gate weigh every member themselves: their group has no
  /// router).
  virtual bool uses_routing() const { return true; }
  /// The members' weights (B, T, N) of the last call when kept: attention probabilities, gate values,
  /// routing weights.
  const at::Tensor& last_weights() const { return last_weights_; }
  /// Keep the last weights (off by default: a backbone's expert MLP does not pay for them).
  void keep_weights(bool on) { keep_weights_ = on; }

 protected:
  at::Tensor last_weights_;
  bool keep_weights_ = false;
};

/// Sum over each row's routed members of weight * change, each member run once on its rows (grouped
/// dispatch, routing/mixture.h).
class WeightedSum : public Aggregator {
 public:
  std::string kind() const override { return "weighted_sum"; }
  at::Tensor combine(const at::Tensor& input, const at::Tensor& current, const Routing& routing,
                     const GroupMembers& members) override;
};

/// AdapterFusion's attention over every member's change.
class AttentionFusion : public Aggregator {
 public:
  /// Query and key small random (std 0.02 from `gen`), value the identity, over width `C`.
  AttentionFusion(int64_t C, double temperature, at::Generator& gen, c10::TensorOptions dtype);
  std::string kind() const override { return "attention"; }
  at::Tensor combine(const at::Tensor& input, const at::Tensor& current, const Routing& routing,
                     const GroupMembers& members) override;
  void register_parameters(torch::nn::Module& owner) override;
  bool uses_routing() const override { return false; }
  double temperature;
  at::Tensor query, key, value;  // (C, C) each
};

/// A learned sigmoid gate per member, from the current output.
class GateFusion : public Aggregator {
 public:
  GateFusion(int64_t members, int64_t C, c10::TensorOptions dtype);
  std::string kind() const override { return "gate"; }
  at::Tensor combine(const at::Tensor& input, const at::Tensor& current, const Routing& routing,
                     const GroupMembers& members) override;
  void register_parameters(torch::nn::Module& owner) override;
  bool uses_routing() const override { return false; }
  at::Tensor weight, bias;  // (N, C), (N)
};

/// The members' LoRA factors averaged per example, then one low-rank product (SMEAR; Polytropon and MHR).
class ParameterAverage : public Aggregator {
 public:
  /// `heads` > 1: A's input columns and B's output rows in `heads` slices, each averaged with its own
  /// weights (the routing's head_dense).
  explicit ParameterAverage(int64_t heads = 1) : heads_(heads) {}
  std::string kind() const override { return "parameter_average"; }
  at::Tensor combine(const at::Tensor& input, const at::Tensor& current, const Routing& routing,
                     const GroupMembers& members) override;
  /// Averaged factors for per-example weights (B, heads, E): A (B, r, in), B (B, out, r).
  std::pair<at::Tensor, at::Tensor> average(const at::Tensor& A, const at::Tensor& B,
                                            const at::Tensor& weights) const;

 private:
  int64_t heads_;
};

/// Each example's weights (B, heads, E) from a routing over B examples or B*T tokens (an example-level
/// decision expanded to its tokens: the first token's).
at::Tensor example_weights(const Routing& routing, int64_t B, int64_t T);

}  // namespace mdl
