#include "mdl/routing/router.h"

#include <ATen/ATen.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/core/fields.h"

namespace mdl {

void to_json(nlohmann::json& j, const RouterOptions& o) {
  j = router_fields().write(o);
}

const FieldList<RouterOptions>& router_fields() {
  static const FieldList<RouterOptions> f =
      FieldList<RouterOptions>("router")
          .add("kind", &RouterOptions::kind, "softmax | top_k | switch | expert_choice | hash | gumbel")
          .add("k", &RouterOptions::k, "experts per row (top_k)")
          .add("normalize", &RouterOptions::normalize, "top_k: renormalise the k weights to sum to one")
          .add("capacity_factor", &RouterOptions::capacity_factor,
               "top_k: > 0 caps rows per expert (Switch); expert_choice: rows per expert x E / N (default 1)")
          .add("temperature", &RouterOptions::temperature, "softmax / gumbel temperature")
          .add("level", &RouterOptions::level,
               "token | example (the mean of its tokens) | task (learned per-task logits)")
          .add("shared", &RouterOptions::shared, "one decision for all layers: the first routed layer's")
          .add("load_balancing_coef", &RouterOptions::load_balancing_coef,
               "weight of the Switch load-balancing loss")
          .add("z_loss_coef", &RouterOptions::z_loss_coef, "weight of the router z-loss")
          .add("mi_loss_coef", &RouterOptions::mi_loss_coef,
               "weight of the mutual-information loss H(e|x) - H(e): sharp and balanced routing "
               "(ModuleFormer)")
          .add("concentration_coef", &RouterOptions::concentration_coef,
               "weight of the usage entropy H(e): few experts carry the data (ModuleFormer, before pruning)")
          .add("sample_topk", &RouterOptions::sample_topk,
               "top_k in training: the last this many of the k drawn from the rest of the distribution "
               "(ModuleFormer)")
          .add("unit_weights", &RouterOptions::unit_weights,
               "selected experts weigh 1 (MoEfication: the sum of the groups)")
          .check([](const RouterOptions& o) { validate(o); });
  return f;
}

void validate(const RouterOptions& o) {
  make_router(o);  // validates
}

void from_json(const nlohmann::json& j, RouterOptions& o) {
  o = router_fields().read(j);
}

at::Tensor Routing::dense_weights() const {
  if (dense.defined()) return dense;
  at::Tensor out = at::zeros({rows, experts}, weight.options());
  return out.index_put({row, expert}, weight, /*accumulate=*/true);
}

void set_sparse_from_dense(Routing& r, bool all) {
  const int64_t N = r.dense.size(0), E = r.dense.size(1);
  auto opts = r.dense.options().dtype(at::kLong);
  if (all) {
    r.row = at::arange(N, opts).repeat_interleave(E);
    r.expert = at::arange(E, opts).repeat({N});
    r.weight = r.dense.reshape({-1});
  } else {
    at::Tensor nz = r.dense.detach().nonzero();  // (M, 2)
    r.row = nz.select(1, 0).contiguous();
    r.expert = nz.select(1, 1).contiguous();
    r.weight = r.dense.index({r.row, r.expert});
  }
}

Routing expand_rows(const Routing& r, int64_t T) {
  if (T == 1) return r;
  Routing e = r;
  e.rows = r.rows * T;
  const int64_t M = r.row.numel();
  e.row = r.row.repeat_interleave(T) * T + at::arange(T, r.row.options()).repeat({M});
  e.expert = r.expert.repeat_interleave(T);
  e.weight = r.weight.repeat_interleave(T);
  for (at::Tensor* t : {&e.dense, &e.logits, &e.probs})
    if (t->defined()) *t = t->repeat_interleave(T, 0);
  if (r.chosen.defined()) e.chosen = r.chosen * static_cast<double>(T);
  e.requested = r.requested * T;
  e.dropped = r.dropped * T;
  return e;
}

namespace {

void check_logits(const at::Tensor& logits, int64_t experts, const char* kind) {
  MDL_CHECK(logits.defined() && logits.dim() == 2 && logits.size(1) == experts, "[router] ", kind,
            " routing needs logits (rows, ", experts, "), got ",
            logits.defined() ? shape_str(logits.sizes().vec()) : std::string("none"));
}

Routing with_logits(const at::Tensor& logits, int64_t experts, double temperature) {
  Routing r;
  r.rows = logits.size(0);
  r.experts = experts;
  r.logits = logits;
  // (N, E) in float32 at least: half-precision logits are widened, double ones kept.
  const auto precision = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  r.probs = at::softmax(logits.to(precision) / temperature, -1);
  return r;
}

class SoftmaxRouter : public Router {
 public:
  using Router::Router;
  Routing route(const at::Tensor& logits, int64_t experts, const RouterInput&) const override {
    check_logits(logits, experts, "softmax");
    Routing r = with_logits(logits, experts, options_.temperature);
    r.dense = r.probs;
    set_sparse_from_dense(r, true);
    r.chosen = r.probs.detach().sum(0);
    r.requested = r.rows;
    return r;
  }
};

class TopKRouter : public Router {
 public:
  using Router::Router;
  Routing route(const at::Tensor& logits, int64_t experts, const RouterInput& in) const override {
    check_logits(logits, experts, "top-k");
    const int64_t k = options_.k;
    MDL_CHECK(k <= experts, "[router] top-k with k = ", k, " but only ", experts, " experts");
    Routing r = with_logits(logits, experts, options_.temperature);
    const int64_t N = r.rows;
    auto [w, idx] = r.probs.topk(k, -1);  // (N, k), largest first
    if (in.training && options_.sample_topk > 0) {
      // The first k - s by probability, the last s drawn from the others (ModuleFormer's sample_topk).
      const int64_t s = options_.sample_topk, keep = k - s;
      at::Tensor top = idx.narrow(1, 0, keep);
      at::Tensor rest = (r.probs.detach() + 1e-6).scatter(1, top, 0.0);
      idx = at::cat({top, at::multinomial(rest, s, /*replacement=*/false)}, 1);
      w = r.probs.gather(1, idx);
    }
    if (options_.unit_weights)
      w = at::ones_like(w);
    else if (options_.normalize)
      w = w / w.sum(-1, true);
    // Slot-major order (every row's first choice before any second choice, as GShard), so capacity
    // dropping hits second choices first and rows in order within a slot.
    r.row = at::arange(N, idx.options()).repeat({k});
    r.expert = idx.t().reshape({-1});
    r.weight = w.t().reshape({-1});
    r.chosen = at::bincount(r.expert, {}, experts).to(at::kFloat);
    r.requested = N * k;
    if (options_.capacity_factor > 0) {
      const int64_t capacity = static_cast<int64_t>(std::ceil(options_.capacity_factor * N * k / experts));
      // Position of each assignment within its expert's queue: a running count per expert.
      at::Tensor onehot = at::one_hot(r.expert, experts);                                      // (M, E)
      at::Tensor position = onehot.cumsum(0).gather(1, r.expert.unsqueeze(1)).squeeze(1) - 1;  // (M)
      at::Tensor keep = position < capacity;
      r.dropped = r.requested - keep.sum().item<int64_t>();
      if (r.dropped > 0) {
        r.row = r.row.masked_select(keep);
        r.expert = r.expert.masked_select(keep);
        r.weight = r.weight.masked_select(keep);
      }
    }
    return r;
  }
};

class ExpertChoiceRouter : public Router {
 public:
  using Router::Router;
  Routing route(const at::Tensor& logits, int64_t experts, const RouterInput& in) const override {
    MDL_CHECK(
        !in.causal,
        "[router] expert-choice routing lets every token compete with later tokens of the "
        "sequence, which a causal decoder may not see; use top_k or switch for decoders, or expert_choice "
        "on an encoder");
    check_logits(logits, experts, "expert-choice");
    Routing r = with_logits(logits, experts, options_.temperature);
    const int64_t N = r.rows;
    const double cf = options_.capacity_factor > 0 ? options_.capacity_factor : 1.0;
    const int64_t c = std::min<int64_t>(N, static_cast<int64_t>(std::ceil(cf * N / experts)));
    auto [w, idx] = r.probs.topk(c, 0);  // (c, E): each expert's rows
    r.row = idx.reshape({-1});
    r.expert = at::arange(experts, idx.options()).repeat({c});
    r.weight = w.reshape({-1});
    r.chosen = at::full({experts}, static_cast<double>(c), r.probs.options());
    r.requested = N;  // rows; a row no expert took is "dropped"
    r.dropped = N - at::bincount(r.row, {}, N).gt(0).sum().item<int64_t>();
    return r;
  }
};

class HashRouter : public Router {
 public:
  using Router::Router;
  bool uses_logits() const override { return false; }
  Routing route(const at::Tensor&, int64_t experts, const RouterInput& in) const override {
    MDL_CHECK(in.token_ids.defined() && in.token_ids.dim() == 1,
              "[router] hash routing needs the token ids of the rows; "
              "it routes tokens (level 'token') of a model called with input_ids");
    Routing r;
    r.rows = in.token_ids.size(0);
    r.experts = experts;
    // Knuth's multiplicative hash: a fixed, balanced-in-expectation map from token id to expert.
    r.row = at::arange(r.rows, in.token_ids.options().dtype(at::kLong));
    r.expert = ((in.token_ids.to(at::kLong) * static_cast<int64_t>(2654435761))
                    .bitwise_and(static_cast<int64_t>(0xffffffff)))
                   .remainder(experts);
    r.weight = at::ones({r.rows}, at::kFloat).to(in.token_ids.device());
    r.chosen = at::bincount(r.expert, {}, experts).to(at::kFloat);
    r.requested = r.rows;
    return r;
  }
};

class GumbelRouter : public Router {
 public:
  using Router::Router;
  Routing route(const at::Tensor& logits, int64_t experts, const RouterInput& in) const override {
    check_logits(logits, experts, "gumbel");
    Routing r = with_logits(logits, experts, options_.temperature);
    const int64_t N = r.rows;
    at::Tensor weight;
    at::Tensor idx;
    if (in.training) {
      at::Tensor u = at::rand_like(r.probs).clamp(1e-10, 1.0 - 1e-7);
      at::Tensor y = at::softmax((logits.to(at::kFloat) - (-u.log()).log()) / options_.temperature,
                                 -1);  // relaxed sample
      idx = y.argmax(-1);
      at::Tensor hard = at::one_hot(idx, experts).to(y.scalar_type());
      weight =
          (hard - y.detach() + y).gather(1, idx.unsqueeze(1)).squeeze(1);  // 1 forward, y's gradient backward
    } else {
      idx = r.probs.argmax(-1);
      weight = at::ones({N}, r.probs.options());
    }
    r.row = at::arange(N, idx.options());
    r.expert = idx;
    r.weight = weight;
    r.chosen = at::bincount(idx, {}, experts).to(at::kFloat);
    r.requested = N;
    return r;
  }
};

}  // namespace

std::shared_ptr<Router> make_router(const RouterOptions& o) {
  MDL_CHECK(o.level == "token" || o.level == "example" || o.level == "task", "[router] level '", o.level,
            "' is unknown; expected token, example or task");
  MDL_CHECK(o.temperature > 0, "[router] temperature must be > 0, got ", o.temperature);
  MDL_CHECK(o.mi_loss_coef >= 0 && o.concentration_coef >= 0,
            "[router] mi_loss_coef and concentration_coef must be "
            ">= 0, got ",
            o.mi_loss_coef, " and ", o.concentration_coef);
  MDL_CHECK(o.capacity_factor >= 0, "[router] capacity_factor must be >= 0 (0 = dropless), got ",
            o.capacity_factor);
  if (o.kind == "softmax") return std::make_shared<SoftmaxRouter>(o);
  if (o.kind == "top_k") {
    MDL_CHECK(o.k >= 1, "[router] k must be >= 1, got ", o.k);
    MDL_CHECK(o.sample_topk >= 0 && o.sample_topk <= o.k, "[router] sample_topk must be in 0..k (", o.k,
              "), got ", o.sample_topk);
    return std::make_shared<TopKRouter>(o);
  }
  if (o.kind == "switch") {  // Switch Transformer: top-1, the gate probability as weight, capacity 1.25
    RouterOptions s = o;
    s.k = 1;
    s.normalize = false;
    if (s.capacity_factor == 0) s.capacity_factor = 1.25;
    return std::make_shared<TopKRouter>(s);
  }
  if (o.kind == "expert_choice") return std::make_shared<ExpertChoiceRouter>(o);
  if (o.kind == "hash") {
    MDL_CHECK(o.level == "token", "[router] hash routing hashes token ids; its level must be 'token', got '",
              o.level, "'");
    return std::make_shared<HashRouter>(o);
  }
  if (o.kind == "gumbel") return std::make_shared<GumbelRouter>(o);
  MDL_FAIL("[router] unknown router kind '", o.kind,
           "'; expected softmax, top_k, switch, expert_choice, hash or gumbel");
}

}  // namespace mdl
