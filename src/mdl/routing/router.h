// Routers (the survey's routing functions r): from router logits over E experts (or the token ids, or
// the task) to a routing: which experts each row uses and with what weight. Rows are tokens, examples
// or tasks (the level is the owner's choice: it pools or looks up the rows before calling route, then
// expands the result to tokens with `expand_rows`).
//
// A routing is sparse, as (row, expert, weight) assignments sorted by nothing in particular, so top-k,
// capacity dropping and expert choice (where an expert picks its tokens and a token may get 0..E
// experts) share one representation and one dispatch; a dense router (softmax gating) also sets `dense`.
//
// Kinds (RouterOptions::kind):
//   softmax       dense softmax gating over every expert (mixture of experts at representation level)
//   top_k         softmax then the k largest; `normalize` renormalises them to sum to one (Mixtral, GShard);
//                 `sample_topk` s: in training the last s of the k are drawn from the rest of the
//                 distribution (multinomial over p + 1e-6 without the first k - s; ModuleFormer's
//                 exploration); `capacity_factor` > 0 caps each expert at ceil(cf * N * k / E) rows, the
//                 overflow is dropped in row order and counted (Switch); 0 is dropless
//   switch        top_k with k = 1, no renormalisation, capacity factor 1.25 unless set
//   expert_choice every expert takes its ceil(cf * N / E) highest-scoring rows (Zhou et al., 2022); a row
//                 sees the future of the sequence through the competition, so causal models refuse it
//   hash          expert = a fixed hash of the token id, weight 1 (Roller et al., 2021); no parameters
//   gumbel        straight-through Gumbel-softmax: in training a one-hot sample whose gradient is the
//                 relaxed sample's, at evaluation the argmax; weight 1 in the forward pass
#pragma once

#include <ATen/core/Tensor.h>

#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>

namespace mdl {

template <class T>
class FieldList;

/// How a router decides.
struct RouterOptions {
  std::string kind = "top_k";  ///< softmax | top_k | switch | expert_choice | hash | gumbel
  int64_t k = 2;               ///< experts per row (top_k)
  bool normalize = true;       ///< top_k: renormalise the k weights to sum to one
  /// top_k: > 0 caps rows per expert (Switch); expert_choice: rows per expert x E / N (default 1)
  double capacity_factor = 0.0;
  double temperature = 1.0;  ///< softmax / gumbel temperature
  /// token | example (mean over the example's tokens) | task (learned per-task logits)
  std::string level = "token";
  bool shared = false;  ///< one decision for all layers: the first routed layer's is reused by the others
  /// weight of the Switch load-balancing loss in the routing log's aux loss
  double load_balancing_coef = 0.0;
  double z_loss_coef = 0.0;  ///< weight of the router z-loss
  /// weight of the mutual-information loss H(e|x) - H(e) in the aux loss (ModuleFormer)
  double mi_loss_coef = 0.0;
  /// weight of the usage entropy H(e) in the aux loss (load concentration, before pruning)
  double concentration_coef = 0.0;
  bool unit_weights = false;  ///< selected experts get weight 1 (MoEfication: the sum of the selected groups)
  /// top_k in training: the last this many of the k drawn from the rest (ModuleFormer)
  int64_t sample_topk = 0;
};
void to_json(nlohmann::json& j, const RouterOptions& o);
void from_json(const nlohmann::json& j, RouterOptions& o);
/// The fields of RouterOptions: JSON keys, defaults and meanings (core/fields.h).
const FieldList<RouterOptions>& router_fields();
/// Throws naming the field when a value is out of its range (its field list runs it after reading).
void validate(const RouterOptions& o);

/// A routing of N rows over E experts.
struct Routing {
  int64_t rows = 0, experts = 0;
  at::Tensor row;         ///< (M) int64: the row of each assignment
  at::Tensor expert;      ///< (M) int64: its expert
  at::Tensor weight;      ///< (M): its weight (differentiable for learned routers)
  at::Tensor dense;       ///< (N, E) weights of a dense router (every expert for every row); else undefined
  at::Tensor head_dense;  ///< (N, heads, E) multi-head routing (MHR): each head's weights; else undefined
  at::Tensor logits;      ///< (N, E) router logits, when there are any (for the z-loss)
  at::Tensor probs;       ///< (N, E) softmax(logits), when there are logits (for the load-balancing loss)
  at::Tensor chosen;      ///< (E) float: rows that chose each expert before capacity dropping
  int64_t requested = 0;  ///< assignments before dropping
  int64_t dropped = 0;    ///< assignments dropped for capacity (those rows pass through the residual)

  /// (N, E) weight of every expert for every row (zeros where not routed).
  at::Tensor dense_weights() const;
};

/// What a router may need besides logits.
struct RouterInput {
  at::Tensor token_ids;   ///< (N) int64, for hash routing
  bool causal = false;    ///< rows are tokens of a causal model
  bool training = false;  ///< sample (gumbel) instead of taking the argmax
};

/// A routing policy. Stateless apart from its options (learned parameters belong to the owner's gate).
class Router {
 public:
  explicit Router(RouterOptions options) : options_(std::move(options)) {}
  virtual ~Router() = default;
  const RouterOptions& options() const { return options_; }
  /// Routes N rows given logits (N, E); `experts` is E (for routers without logits: hash).
  virtual Routing route(const at::Tensor& logits, int64_t experts, const RouterInput& in) const = 0;
  /// Whether the router reads logits (hash does not).
  virtual bool uses_logits() const { return true; }

 protected:
  RouterOptions options_;
};

/// The router for `options.kind`; unknown kinds and invalid settings are refused naming the field.
std::shared_ptr<Router> make_router(const RouterOptions& options);

/// A routing of B rows (examples) expanded to B * T token rows (each example's decision for all its tokens).
Routing expand_rows(const Routing& r, int64_t T);

/// Sparse assignments from dense weights (N, E): every non-zero entry (or every entry if `all`).
void set_sparse_from_dense(Routing& r, bool all);

}  // namespace mdl
