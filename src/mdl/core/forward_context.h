// What a site function may need to know about the forward pass it runs in, beyond its own input: how
// many positions the KV cache already holds (prompt tuning prepends its virtual tokens only on the first
// pass of a generation). The model sets it for the duration of a forward (RAII, per thread); the routing
// issue extends it with the batch's routing context.
#pragma once

#include <cstdint>

namespace mdl {

/// Per-forward information for site functions.
struct ForwardContext {
  int64_t past = 0;  ///< positions already in the KV cache (0 on a fresh pass)

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
