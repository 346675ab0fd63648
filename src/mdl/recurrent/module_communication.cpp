#include "mdl/recurrent/module_communication.h"

#include <ATen/ATen.h>

#include <cmath>

namespace mdl {

ModuleCommunicationImpl::ModuleCommunicationImpl(int64_t modules, int64_t hidden, int64_t key_dim,
                                                 uint64_t seed)
    : key_dim_(key_dim) {
  query = register_module("query", GroupLinear(modules, hidden, key_dim, seed));
  key = register_module("key", GroupLinear(modules, hidden, key_dim, seed + 1));
  value = register_module("value", GroupLinear(modules, hidden, hidden, seed + 2));
}

at::Tensor ModuleCommunicationImpl::forward(const at::Tensor& h, const at::Tensor& bias) {
  at::Tensor logits = at::matmul(query->forward(h), key->forward(h).transpose(1, 2)) /
                      std::sqrt(static_cast<double>(key_dim_));  // (B, M, M)
  if (bias.defined()) logits = logits + bias;
  return h + at::matmul(at::softmax(logits, -1), value->forward(h));
}

}  // namespace mdl
