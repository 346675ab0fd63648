#include "mdl/recurrent/module_gru.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>

#include "mdl/core/error.h"

namespace mdl {

ModuleGruImpl::ModuleGruImpl(int64_t modules, int64_t in, int64_t hidden, uint64_t seed) {
  MDL_CHECK(modules > 0 && in > 0 && hidden > 0, "[module_gru] needs positive sizes, got ", modules,
            " modules, input ", in, ", hidden ", hidden);
  auto gen = at::detail::createCPUGenerator(seed);
  const double bound = 1.0 / std::sqrt(static_cast<double>(hidden));
  auto uniform = [&](at::IntArrayRef shape) { return at::empty(shape).uniform_(-bound, bound, gen); };
  weight_ih = register_parameter("weight_ih", uniform({modules, 3 * hidden, in}));
  weight_hh = register_parameter("weight_hh", uniform({modules, 3 * hidden, hidden}));
  bias_ih = register_parameter("bias_ih", uniform({modules, 3 * hidden}));
  bias_hh = register_parameter("bias_hh", uniform({modules, 3 * hidden}));
}

at::Tensor ModuleGruImpl::forward(const at::Tensor& x, const at::Tensor& h) {
  const int64_t M = weight_ih.size(0), H = weight_hh.size(2), in = weight_ih.size(2);
  MDL_CHECK(x.dim() == 3 && x.size(1) == M && x.size(2) == in && h.dim() == 3 && h.size(0) == x.size(0) &&
                h.size(1) == M && h.size(2) == H,
            "[module_gru] expects x (B, ", M, ", ", in, ") and h (B, ", M, ", ", H, "), got ", x.sizes(),
            " and ", h.sizes());
  // One batched product per side over the modules: (M, B, in) x (M, in, 3H) -> (M, B, 3H).
  const at::Tensor gi = at::baddbmm(bias_ih.unsqueeze(1), x.transpose(0, 1), weight_ih.transpose(1, 2));
  const at::Tensor gh = at::baddbmm(bias_hh.unsqueeze(1), h.transpose(0, 1), weight_hh.transpose(1, 2));
  const auto i = gi.chunk(3, -1), g = gh.chunk(3, -1);
  const at::Tensor r = at::sigmoid(i[0] + g[0]), z = at::sigmoid(i[1] + g[1]);
  const at::Tensor n = at::tanh(i[2] + r * g[2]);
  const at::Tensor out = (1 - z) * n + z * h.transpose(0, 1);  // (M, B, H)
  return out.transpose(0, 1);
}

}  // namespace mdl
