#include "mdl/modules/lora_bank.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "mdl/core/error.h"

namespace mdl {

void LoraBank::update(const std::vector<Factors>& loras) {
  std::vector<const void*> ids;
  std::vector<int64_t> versions;
  for (const auto& f : loras) {
    ids.push_back(f.A.data_ptr()), ids.push_back(f.B.data_ptr());
    versions.push_back(static_cast<int64_t>(f.A._version())), versions.push_back(static_cast<int64_t>(f.B._version()));
  }
  if (a_.defined() && ids == ids_ && versions == versions_) return;
  MDL_CHECK(!loras.empty(), "[lora_bank] nothing to stack");
  int64_t r_max = 0;
  for (const auto& f : loras) r_max = std::max(r_max, f.A.size(0));
  const int64_t in = loras[0].A.size(1), out = loras[0].B.size(0), n = static_cast<int64_t>(loras.size());
  at::Tensor a = at::zeros({n + 1, r_max, in}, loras[0].A.options().requires_grad(false));
  at::Tensor b = at::zeros({n + 1, out, r_max}, loras[0].B.options().requires_grad(false));
  for (int64_t i = 0; i < n; ++i) {
    const Factors& f = loras[static_cast<size_t>(i)];
    MDL_CHECK(f.A.size(1) == in && f.B.size(0) == out, "[lora_bank] LoRA ", i, " is (", f.B.size(0), " x ", f.A.size(1),
              "), the site is (", out, " x ", in, ")");
    const int64_t r = f.A.size(0);
    a[i].narrow(0, 0, r).copy_(f.A.detach());
    b[i].narrow(1, 0, r).copy_(f.B.detach() * f.scaling);
  }
  a_ = a, b_ = b, n_ = n, ids_ = std::move(ids), versions_ = std::move(versions);
}

at::Tensor LoraBank::apply(const at::Tensor& x, const at::Tensor& current, const at::Tensor& idx,
                           const at::Tensor& scale) const {
  const int64_t rows = x.size(0);
  at::Tensor x3 = x.reshape({rows, -1, x.size(-1)});                    // (B, T, in)
  at::Tensor a = a_.index_select(0, idx);                               // (B, r, in)
  at::Tensor b = b_.index_select(0, idx);                               // (B, out, r)
  at::Tensor h = at::bmm(x3.to(a.scalar_type()), a.transpose(1, 2));  // (B, T, r)
  h = h * scale.to(h.scalar_type()).view({-1, 1, 1});
  at::Tensor delta = at::bmm(h, b.transpose(1, 2));                     // (B, T, out)
  return current + delta.view(current.sizes()).to(current.scalar_type());
}

}  // namespace mdl
