#include "mdl/modularity/rule_models.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/activation.h>
#include <torch/utils.h>

#include <cmath>

#include "mdl/core/error.h"

namespace mdl {

RuleMlpModelImpl::RuleMlpModelImpl(const RuleModelOptions& o, uint64_t seed) : options_(o) {
  const std::string& f = o.family;
  MDL_CHECK(f == "monolithic" || f == "modular" || f == "modular_op" || f == "gt", "[rule-model] family '", f,
            "' is unknown; expected monolithic, modular, modular_op or gt");
  MDL_CHECK(o.rules >= 1 && o.modules >= 1 && o.encoder >= 1 && o.dim >= 1 && o.dim % o.modules == 0,
            "[rule-model] needs rules, modules, encoder >= 1 and dim a multiple of modules; got rules ",
            o.rules, ", modules ", o.modules, ", encoder ", o.encoder, ", dim ", o.dim);
  MDL_CHECK(f != "gt" || o.modules == o.rules,
            "[rule-model] gt routes by the true rule: it needs modules = ", "rules, got ", o.modules, " and ",
            o.rules);
  using torch::nn::Linear;
  using torch::nn::ReLU;
  const int64_t e = o.encoder, d = o.dim, M = o.modules;
  enc_digit = register_module("enc_digit", torch::nn::Sequential(Linear(1, e), ReLU(), Linear(e, e)));
  enc_op = register_module("enc_op", torch::nn::Sequential(Linear(o.rules, e), ReLU(), Linear(e, e)));
  decoder = register_module("decoder", torch::nn::Sequential(Linear(d, e), ReLU(), Linear(e, 1)));
  if (f == "monolithic") {
    mono = register_module("mono", torch::nn::Sequential(Linear(3 * e, d), ReLU(), Linear(d, d)));
    return;
  }
  first = register_module("first", GroupLinear(M, 3 * e, d / M, seed + 1));
  second = register_module("second", GroupLinear(M, d / M, f == "modular" ? d + 1 : d, seed + 2));
  if (f == "modular_op") op_router = register_module("op_router", Linear(e, M));
  // PyTorch's default Linear init, U(-1/sqrt(in), 1/sqrt(in)), from this model's own seed rather than the
  // global generator.
  torch::NoGradGuard no_grad;
  auto gen = at::detail::createCPUGenerator(seed);
  for (const auto& child : modules(/*include_self=*/false))
    if (auto* linear = child->as<torch::nn::LinearImpl>()) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(linear->weight.size(1)));
      linear->weight.uniform_(-bound, bound, gen);
      linear->bias.uniform_(-bound, bound, gen);
    }
}

RuleOutput RuleMlpModelImpl::forward(const at::Tensor& input) {
  const RuleModelOptions& o = options_;
  MDL_CHECK(input.dim() == 2 && input.size(1) == 2 + o.rules, "[rule-model] expects (N, ", 2 + o.rules,
            ") inputs [a, b, onehot(c)], got ", input.sizes());
  const int64_t N = input.size(0), M = o.modules, d = o.dim;
  const at::Tensor op = enc_op->forward(input.narrow(1, 2, o.rules));
  const at::Tensor h =
      at::cat({enc_digit->forward(input.narrow(1, 0, 1)), enc_digit->forward(input.narrow(1, 1, 1)), op},
              1);  // (N, 3e)
  RuleOutput out;
  if (o.family == "monolithic") {
    out.prediction = decoder->forward(mono->forward(h));
    return out;
  }
  at::Tensor m = second(at::relu(first(h.unsqueeze(1).expand({N, M, h.size(1)}))));  // (N, M, d [+1])
  if (o.family == "modular") {
    out.routing = at::softmax(m.select(2, d), 1);
    m = m.narrow(2, 0, d);
  } else if (o.family == "modular_op") {
    out.routing = at::softmax(op_router->forward(op), 1);
  } else {
    out.routing = input.narrow(1, 2, o.rules);  // the true rule's one-hot
  }
  out.prediction = decoder->forward((out.routing.unsqueeze(2) * m).sum(1));
  return out;
}

}  // namespace mdl
