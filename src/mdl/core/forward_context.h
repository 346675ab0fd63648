// What a site function may need to know about the forward pass it runs in, beyond its own input: how
// many positions the KV cache already holds (prompt tuning prepends its virtual tokens only on the first
// pass of a generation), the batch's routing context (task and language ids, per-example module choices),
// where routers record their statistics and auxiliary losses, the token ids (hash routing) and whether
// attention is causal (expert-choice routing refuses it). The model sets it for the duration of a forward
// (RAII, per thread).
#pragma once

#include <cstdint>

namespace at {
class Tensor;
}

namespace mdl {

struct RoutingContext;
class RoutingLog;

/// Per-forward information for site functions.
struct ForwardContext {
  int64_t past = 0;                         ///< positions already in the KV cache (0 on a fresh pass)
  bool causal = false;                      ///< decoder (causal attention): a token may not see later tokens
  const at::Tensor* input_ids = nullptr;    ///< (B, T) the pass's token ids, when the model has them
  const RoutingContext* routing = nullptr;  ///< task/language ids and per-example module choices; optional
  RoutingLog* routing_log = nullptr;        ///< routers record statistics and auxiliary losses here; optional

  /// The context of the forward running on this thread (a default one outside any forward).
  static const ForwardContext& current();
};

/// Makes `context` current on this thread until destroyed (restores the previous one).
class ForwardContextGuard {
 public:
  explicit ForwardContextGuard(const ForwardContext& context);
  ~ForwardContextGuard();
  ForwardContextGuard(const ForwardContextGuard&) = delete;
  ForwardContextGuard& operator=(const ForwardContextGuard&) = delete;

 private:
  const ForwardContext* previous_;
};

}  // namespace mdl
