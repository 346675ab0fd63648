#include "mdl/modularity/rule_models.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/activation.h>
#include <torch/utils.h>

#include <cmath>

#include "mdl/core/error.h"

namespace mdl {

namespace {
/// PyTorch's default Linear and LSTMCell init, U(-1/sqrt(fan), 1/sqrt(fan)), from `seed`.
void init_torch_layers(torch::nn::Module& m, uint64_t seed) {
  torch::NoGradGuard no_grad;
  auto gen = at::detail::createCPUGenerator(seed);
  for (const auto& child : m.modules(/*include_self=*/false)) {
    if (auto* linear = child->as<torch::nn::LinearImpl>()) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(linear->weight.size(1)));
      linear->weight.uniform_(-bound, bound, gen);
      if (linear->bias.defined()) linear->bias.uniform_(-bound, bound, gen);
    } else if (auto* lstm = child->as<torch::nn::LSTMCellImpl>()) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(lstm->options.hidden_size()));
      for (auto& p : lstm->parameters(/*recurse=*/false)) p.uniform_(-bound, bound, gen);
    }
  }
}
}  // namespace

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
  } else {
    first = register_module("first", GroupLinear(M, 3 * e, d / M, seed + 1));
    second = register_module("second", GroupLinear(M, d / M, f == "modular" ? d + 1 : d, seed + 2));
    if (f == "modular_op") op_router = register_module("op_router", Linear(e, M));
  }
  init_torch_layers(*this, seed);  // from this model's own seed rather than the global generator
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

RuleSequenceModelImpl::RuleSequenceModelImpl(const RuleSequenceOptions& o, uint64_t seed) : options_(o) {
  const std::string& f = o.family;
  MDL_CHECK(o.task == "mha" || o.task == "rnn", "[rule-model] task '", o.task,
            "' is unknown; expected mha or rnn");
  MDL_CHECK(f == "monolithic" || f == "modular" || f == "modular_op" || f == "gt", "[rule-model] family '", f,
            "' is unknown; expected monolithic, modular, modular_op or gt");
  MDL_CHECK(
      o.rules >= 1 && o.input > o.rules && o.output >= 1 && o.dim >= 1 && o.heads >= 1 && o.hidden >= 1,
      "[rule-model] needs rules >= 1, input > rules (the one-hot is part of it), output, dim, heads, hidden "
      ">= 1; got rules ",
      o.rules, ", input ", o.input);
  using torch::nn::Linear;
  using torch::nn::LinearOptions;
  using torch::nn::ReLU;
  const int64_t R = o.rules, d = o.dim;
  const bool modular = f != "monolithic";
  encoder = register_module("encoder", torch::nn::Sequential(Linear(o.input, d), ReLU(), Linear(d, d)));
  if (o.task == "mha") {
    const int64_t heads = modular ? o.heads * R : o.heads;
    head_dim_ = o.att_dim / heads;
    MDL_CHECK(head_dim_ >= 1, "[rule-model] att_dim ", o.att_dim, " is smaller than the ", heads, " heads");
    query = register_module("query", Linear(d, heads * head_dim_));
    key = register_module("key", Linear(d, heads * head_dim_));
    value = register_module("value", Linear(d, heads * head_dim_));
    in_ = register_module("in_", Linear(d, head_dim_ * (modular ? R : 1)));
    if (!modular) {
      mono_out = register_module("mono_out", torch::nn::Sequential(Linear(head_dim_ * (o.heads + 1), 2 * d),
                                                                   ReLU(), Linear(2 * d, d)));
    } else {
      // The modules' MLP width that matches the monolithic block's parameters (their code's formula).
      const double num = 2.0 * d * (R * o.heads * (o.att_dim + d) + o.att_dim);
      const double den = R * (o.att_dim * (o.heads + 1) + R * o.heads * d);
      const int64_t inter = std::max<int64_t>(1, static_cast<int64_t>(num / den));
      first = register_module("first", GroupLinear(R, head_dim_ * (o.heads + 1), inter, seed + 1));
      second = register_module("second", GroupLinear(R, inter, f == "modular" ? d + 1 : d, seed + 2));
      if (f == "modular_op")
        scorer = register_module("scorer",
                                 torch::nn::Sequential(Linear(R, head_dim_), ReLU(), Linear(head_dim_, R)));
    }
    decoder = register_module("decoder", torch::nn::Sequential(Linear(d, d), ReLU(), Linear(d, o.output)));
  } else {
    width_ = o.hidden;
    if (!modular) {
      cell = register_module("cell", torch::nn::LSTMCell(d, o.hidden));
    } else {  // the width at which R cells (and their scorer) hold the monolithic cell's parameters
      const double a = 4.0 * R * d + 1;
      double h = a * a + 4.0 * (4.0 * R + 1) * (5.0 * o.hidden * o.hidden + o.hidden * (4.0 * d + 1));
      h = (std::sqrt(h) - a) / (2.0 * (4.0 * R + 1));
      width_ = std::max<int64_t>(1, static_cast<int64_t>(h));
      i2h = register_module("i2h", Linear(LinearOptions(d, 4 * R * width_).bias(false)));
      h2h = register_module("h2h", Linear(LinearOptions(width_, 4 * R * width_).bias(false)));
      if (f == "modular_op")
        scorer = register_module("scorer",
                                 torch::nn::Sequential(Linear(LinearOptions(R, width_).bias(false)), ReLU(),
                                                       Linear(LinearOptions(width_, R).bias(false))));
      if (f == "modular") cell_score = register_module("cell_score", GroupLinear(R, 8 * width_, 1, seed + 3));
    }
    decoder = register_module(
        "decoder", torch::nn::Sequential(Linear(width_, width_), ReLU(), Linear(width_, o.output)));
  }
  init_torch_layers(*this, seed);
}

at::Tensor RuleSequenceModelImpl::recurrence(const at::Tensor& x, const at::Tensor& op, at::Tensor& routing) {
  const RuleSequenceOptions& o = options_;
  const int64_t N = x.size(0), L = x.size(1), R = o.rules, h = width_;
  at::Tensor hs = at::zeros({N, h}, x.options()), cs = at::zeros({N, h}, x.options());
  std::vector<at::Tensor> outs, scores;
  for (int64_t t = 0; t < L; ++t) {
    const at::Tensor xt = x.select(1, t);
    if (o.family == "monolithic") {
      std::tie(hs, cs) = cell->forward(xt, std::make_tuple(hs, cs));
      outs.push_back(hs);
      continue;
    }
    const at::Tensor ih = i2h(xt).view({N, R, 4 * h}), hh = h2h(hs).view({N, R, 4 * h});
    at::Tensor p;  // (N, R, 1)
    if (o.family == "gt") {
      p = op.select(1, t).unsqueeze(-1);
    } else if (o.family == "modular_op") {
      p = at::softmax(scorer->forward(op.select(1, t)), 1).unsqueeze(-1);
    } else {
      p = at::softmax(cell_score(at::relu(at::cat({ih, hh}, -1))), 1);
    }
    const at::Tensor pre = ih + hh;
    const at::Tensor gates = at::sigmoid(pre.narrow(2, 0, 3 * h)), g = at::tanh(pre.narrow(2, 3 * h, h));
    const at::Tensor c = cs.unsqueeze(1) * gates.narrow(2, h, h) + gates.narrow(2, 0, h) * g;  // (N, R, h)
    const at::Tensor hn = gates.narrow(2, 2 * h, h) * at::tanh(c);
    hs = (hn * p).sum(1), cs = (c * p).sum(1);
    outs.push_back(hs);
    scores.push_back(p.squeeze(-1));
  }
  if (!scores.empty()) routing = at::stack(scores, 1);  // (N, L, R)
  return at::stack(outs, 1);                            // (N, L, h)
}

RuleOutput RuleSequenceModelImpl::forward(const at::Tensor& input) {
  const RuleSequenceOptions& o = options_;
  MDL_CHECK(input.dim() == 3 && input.size(2) == o.input, "[rule-model] expects (N, L, ", o.input,
            ") inputs, got ", input.sizes());
  const int64_t N = input.size(0), L = input.size(1), R = o.rules, d = o.dim;
  const at::Tensor op = input.narrow(2, o.input - R, R);  // (N, L, R)
  const at::Tensor x = encoder->forward(input);           // (N, L, d)
  RuleOutput out;
  if (o.task == "rnn") {
    out.prediction = decoder->forward(recurrence(x, op, out.routing));
    return out;
  }
  const bool modular = o.family != "monolithic";
  const int64_t heads = modular ? o.heads * R : o.heads, hd = head_dim_;
  auto split = [&](const at::Tensor& t) {
    return t.view({N, L, heads, hd}).transpose(1, 2);
  };  // (N, H, L, hd)
  const at::Tensor q = split(query(x)) / std::sqrt(static_cast<double>(hd)), k = split(key(x)),
                   v = split(value(x));
  at::Tensor s = at::matmul(q, k.transpose(-1, -2));  // (N, H, L, L)
  s = s.masked_fill(at::eye(L, at::TensorOptions().dtype(at::kBool).device(x.device())), -INFINITY);
  at::Tensor a = at::matmul(at::softmax(s, -1), v).transpose(1, 2);  // (N, L, H, hd)
  if (!modular) {
    const at::Tensor y = mono_out->forward(at::cat({a.reshape({N, L, heads * hd}), in_(x)}, -1));
    out.prediction = decoder->forward(y);
    return out;
  }
  // Module m's heads and its own projection of the token.
  const at::Tensor per = at::cat({a.reshape({N * L, R, o.heads * hd}), in_(x).view({N * L, R, hd})}, -1);
  at::Tensor m = second(at::relu(first(per))).view({N, L, R, -1});  // (N, L, R, d [+1])
  at::Tensor p;                                                     // (N, L, R)
  if (o.family == "modular") {
    p = at::softmax(m.select(3, d), 2);
    m = m.narrow(3, 0, d);
  } else if (o.family == "modular_op") {
    p = at::softmax(scorer->forward(op), -1);
  } else {
    p = op;
  }
  out.routing = p;
  out.prediction = decoder->forward((m * p.unsqueeze(-1)).sum(2));
  return out;
}

}  // namespace mdl
