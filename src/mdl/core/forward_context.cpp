#include "mdl/core/forward_context.h"

namespace mdl {
namespace {
thread_local const ForwardContext* g_current = nullptr;
}  // namespace

const ForwardContext& ForwardContext::current() {
  static const ForwardContext none;
  return g_current ? *g_current : none;
}

ForwardContextGuard::ForwardContextGuard(const ForwardContext& context) : previous_(g_current) {
  g_current = &context;
}
ForwardContextGuard::~ForwardContextGuard() {
  g_current = previous_;
}

}  // namespace mdl
