// Gradient checkpointing: the same loss and the same gradient for every parameter as a plain backward,
// in each architecture, with LoRA dropout (random numbers replayed), a frozen base (LoRA training) and
// a trainable one; routers that log an auxiliary loss are refused.
#include "mdl/backbones/activation_checkpoint.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include "backbones/fixtures.h"
#include "mdl/backbones/model.h"
#include "mdl/core/autocast.h"
#include "mdl/core/forward_context.h"
#include "mdl/modules/module_set.h"
#include "mdl/routing/routing_log.h"

namespace mdl {
namespace {

struct Pass {
  double loss = 0;
  std::vector<at::Tensor> grads;  // every parameter that requires grad, in order (zeros where none)
};

// One backward of a sum of outputs, from the same random state, with or without checkpointing; the
// forward under autocast when `precision` is bf16 (backward outside it, as the trainer does).
Pass backward_once(ModuleSet& set, const ModelInput& in, bool checkpointing,
                   c10::ScalarType precision = at::kFloat) {
  ModelImpl& m = *set.model();
  m.set_gradient_checkpointing(checkpointing);
  m.train();
  at::manual_seed(7);  // LoRA dropout draws the same masks both times
  at::Tensor out;
  {
    AutocastGuard autocast(m.device(), precision);
    out = m.config().head == HeadKind::causal_lm ? m.lm_loss(in, in.input_ids) : m.forward(in).pow(2).mean();
  }
  out.backward();
  Pass r;
  r.loss = out.item<double>();
  std::vector<at::Tensor> params = m.parameters();
  for (auto& p : set.parameters()) params.push_back(p);
  for (auto& p : params) {
    if (!p.requires_grad()) continue;
    r.grads.push_back(p.grad().defined() ? p.grad().clone() : at::zeros_like(p));
    p.mutable_grad() = at::Tensor();
  }
  m.set_gradient_checkpointing(false);
  return r;
}

void expect_same(const Pass& a, const Pass& b, const std::string& what) {
  EXPECT_NEAR(a.loss, b.loss, 1e-6) << what;
  ASSERT_EQ(a.grads.size(), b.grads.size()) << what;
  double worst = 0, largest = 0;
  for (size_t i = 0; i < a.grads.size(); ++i) {
    worst = std::max(worst, (a.grads[i] - b.grads[i]).abs().max().item<double>());
    largest = std::max(largest, a.grads[i].abs().max().item<double>());
  }
  EXPECT_GT(largest, 0) << what << ": no gradient at all";
  EXPECT_LT(worst, 1e-6 * std::max(1.0, largest)) << what;
}

TEST(ActivationCheckpoint, SameLossAndGradientsAsPlainBackwardInEveryArchitecture) {
  // With dropout LoRA runs after the projection; without it, on 96 rows, it is folded into the projection.
  for (const std::string arch : {"llama", "gpt2", "bert"}) {
    for (bool frozen_base : {true, false})
      for (double dropout : {0.1, 0.0}) {
        Model m = load_model(test::tiny_checkpoint(arch));
        ModuleSet set(m);
        ModuleConfig c;
        c.lora.r = 4;
        c.lora.dropout = dropout;
        c.lora.init = "random";
        c.targets.target_modules = {"all-linear"};
        set.add("lora", c);
        if (frozen_base) set.freeze_base({"lora"});
        ModelInput in;
        const std::vector<int64_t> shape =
            dropout > 0 ? std::vector<int64_t>{2, 7} : std::vector<int64_t>{4, 24};
        in.input_ids = at::randint(1, m->config().vocab_size, shape, at::kLong);
        const std::string what =
            arch + (frozen_base ? " LoRA only" : " full") + (dropout > 0 ? " dropout" : " folded");
        const Pass plain = backward_once(set, in, false), ckpt = backward_once(set, in, true);
        expect_same(plain, ckpt, what);
        // Under bf16 autocast the rerun is in bf16 too: the same gradients as a plain bf16 backward.
        const Pass plain16 = backward_once(set, in, false, at::kBFloat16),
                   ckpt16 = backward_once(set, in, true, at::kBFloat16);
        expect_same(plain16, ckpt16, what + " bf16");
      }
  }
}

TEST(ActivationCheckpoint, OnlyInTrainingWithAGradientWanted) {
  Model m = load_model(test::tiny_checkpoint("llama"));
  m->set_gradient_checkpointing(true);
  ModelInput in;
  in.input_ids = at::randint(1, m->config().vocab_size, {1, 5}, at::kLong);
  m->eval();
  at::Tensor eval_out = m->forward(in);
  EXPECT_NE(eval_out.grad_fn(), nullptr);  // an ordinary graph: evaluation does not checkpoint
  EXPECT_EQ(std::string(eval_out.grad_fn()->name()).find("CheckpointFn"), std::string::npos);
  m->train();
  at::Tensor train_out = m->forward(in);
  // Under checkpointing the layers' nodes are one CheckpointFn per layer, reached from the head.
  bool found = false;
  std::vector<torch::autograd::Node*> todo = {train_out.grad_fn().get()};
  for (size_t i = 0; i < todo.size() && i < 200; ++i)
    for (const auto& e : todo[i]->next_edges())
      if (e.function) {
        found = found || std::string(e.function->name()).find("CheckpointFn") != std::string::npos;
        todo.push_back(e.function.get());
      }
  EXPECT_TRUE(found);
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(at::allclose(m->forward(in), eval_out.detach(), 1e-6, 1e-6));
}

TEST(ActivationCheckpoint, RoutersWithAnAuxiliaryLossAreRefused) {
  Model m = load_model(test::tiny_checkpoint("mixtral"));
  m->set_gradient_checkpointing(true);
  m->train();
  RoutingLog log;
  ModelInput in;
  in.input_ids = at::randint(1, m->config().vocab_size, {2, 6}, at::kLong);
  in.routing_log = &log;
  EXPECT_THROW_WITH(m->forward(in), "[checkpointing] a router at 'model.layers.0.block_sparse_moe'",
                    "train this model without it");
  in.routing_log = nullptr;  // no log asked for: nothing is lost
  at::Tensor out = m->forward(in);
  out.sum().backward();
  const at::Tensor gate = m->named_parameters()["model.layers.0.block_sparse_moe.gate.weight"];
  ASSERT_TRUE(gate.grad().defined());  // the router trains through the rerun
  EXPECT_GT(gate.grad().abs().sum().item<double>(), 0);
}

// The function itself, on a layer that draws random numbers: backward sees the same draw.
TEST(ActivationCheckpoint, ReplaysRandomNumbersAndRestoresTheGenerator) {
  at::Tensor w = at::randn({4, 4}).requires_grad_(true);
  LayerFn layer = [w](const at::Tensor& x) { return at::dropout(at::matmul(x, w), 0.5, true); };
  at::Tensor x = at::randn({3, 4}).requires_grad_(true);
  at::manual_seed(3);
  at::Tensor plain = layer(x);
  plain.sum().backward();
  at::Tensor gx = x.grad().clone(), gw = w.grad().clone();
  x.mutable_grad() = at::Tensor(), w.mutable_grad() = at::Tensor();
  at::manual_seed(3);
  at::Tensor ckpt = checkpointed(layer, x);
  const double after_forward = at::rand({1}).item<double>();
  at::manual_seed(3);
  layer(x);
  const double expected_next = at::rand({1}).item<double>();
  EXPECT_EQ(after_forward, expected_next);
  at::manual_seed(11);
  const double before_backward = at::rand({1}).item<double>();
  at::manual_seed(11);
  ckpt.sum().backward();
  EXPECT_EQ(at::rand({1}).item<double>(), before_backward);  // the caller's generator is as it was
  EXPECT_TRUE(at::equal(plain, ckpt));
  EXPECT_TRUE(at::allclose(x.grad(), gx));
  EXPECT_TRUE(at::allclose(w.grad(), gw));
}

}  // namespace
}  // namespace mdl
