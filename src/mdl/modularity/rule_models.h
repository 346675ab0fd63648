// The four model families of "Is a modular architecture enough?" (Mittal et al., 2022; their MLP code's
// model.py) for the MLP rule task, sharing the encoders and the decoder:
//   encoders   enc_digit (1 -> e -> e, ReLU) on a and on b, enc_op (R -> e -> e) on onehot(c):
//              h = [enc(a), enc(b), enc(op)] (3e)
//   monolithic Linear(3e, d) - ReLU - Linear(d, d)
//   modular    M modules, GroupLinear(M, 3e -> d/M) - ReLU - GroupLinear(M, d/M -> d + 1), h given to each;
//              the last unit is each module's score, p = softmax over modules, the output sum_m p_m o_m
//   modular_op the same modules without the score unit; p = softmax(Linear(e, M)(enc(op)))
//   gt         the modules of modular_op with p = onehot(c) (the true rule: needs M = R)
//   decoder    Linear(d, e) - ReLU - Linear(e, 1) on the (mixed) output
// forward gives the prediction and the routing p (N, M) (undefined for monolithic): what
// routing/specialisation measures.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>

#include <cstdint>
#include <string>

#include "mdl/modularity/group_linear.h"

namespace mdl {

/// A family and its sizes.
struct RuleModelOptions {
  std::string family = "modular";  ///< monolithic | modular | modular_op | gt
  int64_t rules = 4;               ///< R (the input's one-hot width)
  int64_t modules = 4;             ///< M (gt needs M = R)
  int64_t encoder = 32;            ///< e
  int64_t dim = 128;               ///< d (a multiple of M)
};

/// What a rule model gives.
struct RuleOutput {
  at::Tensor prediction;  ///< (N, 1)
  at::Tensor routing;     ///< (N, M) module probabilities; undefined for monolithic
};

class RuleMlpModelImpl : public torch::nn::Module {
 public:
  RuleMlpModelImpl(const RuleModelOptions& options, uint64_t seed);
  /// input (N, 2 + R): [a, b, onehot(c)] (modularity/rule_data.h).
  RuleOutput forward(const at::Tensor& input);
  const RuleModelOptions& options() const { return options_; }

 private:
  RuleModelOptions options_;
  torch::nn::Sequential enc_digit{nullptr}, enc_op{nullptr}, mono{nullptr}, decoder{nullptr};
  GroupLinear first{nullptr}, second{nullptr};
  torch::nn::Linear op_router{nullptr};
};
TORCH_MODULE(RuleMlpModel);

}  // namespace mdl
