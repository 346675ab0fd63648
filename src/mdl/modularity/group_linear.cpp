#include "mdl/modularity/group_linear.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

#include "mdl/core/error.h"

namespace mdl {

GroupLinearImpl::GroupLinearImpl(int64_t G, int64_t in, int64_t out, uint64_t seed) {
  MDL_CHECK(G >= 1 && in >= 1 && out >= 1, "[group-linear] groups, in and out must be >= 1, got ", G, ", ",
            in, ", ", out);
  auto gen = at::detail::createCPUGenerator(seed);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  weight = register_parameter("weight", at::empty({G, in, out}).uniform_(-bound, bound, gen));
  bias = register_parameter("bias", at::empty({G, out}).uniform_(-bound, bound, gen));
}

at::Tensor GroupLinearImpl::forward(const at::Tensor& x) {
  MDL_CHECK(x.dim() == 3 && x.size(1) == weight.size(0) && x.size(2) == weight.size(1), "[group-linear] ",
            "expects (N, ", weight.size(0), ", ", weight.size(1), "), got ", x.sizes());
  return at::bmm(x.transpose(0, 1), weight).transpose(0, 1) + bias;  // (N, G, out)
}

}  // namespace mdl
