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
#include <torch/nn/modules/rnn.h>

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

// The families on the sequence tasks (their MHA and RNN code), with an encoder Linear-ReLU-Linear of the
// whole input ([x, onehot(c)] per step) and a decoder Linear-ReLU-Linear per step:
//   mha  attention over the other tokens (a token never attends to itself), heads of size
//        att_dim / heads (monolithic) or att_dim / (heads R) (modular: R modules of `heads` heads each);
//        each module's heads and its own projection of the token, [attention, in_(x)], go through the
//        module's MLP (GroupLinear - ReLU - GroupLinear, to dim (+1 score unit for modular)); the modules'
//        outputs mixed by p; monolithic: one such block with an MLP of width 2 dim
//   rnn  an LSTM cell (monolithic), or R LSTM cells in one product (i2h and h2h over all of them), whose
//        states are mixed by p every step: modular scores each cell from its own [i2h, h2h] pre-activations
//        (ReLU - GroupLinear(8h -> 1)), modular-op from the rule (Linear - ReLU - Linear), GT by the rule.
//        The modular width h is chosen so the parameter count matches the monolithic cell's (their formula)
// forward gives per-step predictions (N, L, out) and routing (N, L, M) (undefined for monolithic).
struct RuleSequenceOptions {
  std::string task = "mha";        ///< mha | rnn
  std::string family = "modular";  ///< monolithic | modular | modular_op | gt
  int64_t rules = 4;               ///< R = M
  int64_t input = 20;              ///< features per step, the rule's one-hot included (mha 4R + R)
  int64_t output = 1;              ///< predicted values per step
  int64_t dim = 64;                ///< mha: the model width; rnn: the encoder width
  int64_t att_dim = 128;           ///< mha: attention width (heads x head size, over all modules)
  int64_t heads = 4;               ///< mha: heads per module
  int64_t hidden = 64;             ///< rnn: the monolithic cell's width
};

class RuleSequenceModelImpl : public torch::nn::Module {
 public:
  RuleSequenceModelImpl(const RuleSequenceOptions& options, uint64_t seed);
  /// input (N, L, input) whose last R features are the rule's one-hot (modularity/rule_data.h).
  RuleOutput forward(const at::Tensor& input);
  const RuleSequenceOptions& options() const { return options_; }
  /// The modular RNN cells' width (= hidden for monolithic).
  int64_t cell_width() const { return width_; }

 private:
  at::Tensor recurrence(const at::Tensor& x, const at::Tensor& op, at::Tensor& routing);
  RuleSequenceOptions options_;
  int64_t width_ = 0, head_dim_ = 0;
  torch::nn::Sequential encoder{nullptr}, decoder{nullptr}, mono_out{nullptr}, scorer{nullptr};
  torch::nn::Linear query{nullptr}, key{nullptr}, value{nullptr}, in_{nullptr}, i2h{nullptr}, h2h{nullptr};
  GroupLinear first{nullptr}, second{nullptr}, cell_score{nullptr};
  torch::nn::LSTMCell cell{nullptr};
};
TORCH_MODULE(RuleSequenceModel);

}  // namespace mdl
