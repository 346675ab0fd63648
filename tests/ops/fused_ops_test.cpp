// Fused training ops: values and gradients equal the at:: compositions they replace, on the CPU loops
// (float32) and on the generic path (float64, what other devices take); the LM loss through the model.
#include "mdl/ops/fused_ops.h"

#include <ATen/ATen.h>
#include <torch/autograd.h>

#include "backbones/fixtures.h"
#include "mdl/backbones/model.h"
#include "mdl/core/autocast.h"
#include "mdl/core/error.h"
#include "mdl/core/linear.h"
#include "mdl/core/rebuild.h"
#include "mdl/modules/module_set.h"
#include "mdl/ops/functional.h"

namespace mdl {
namespace {

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

// Leaf copies of `ts` that require grad.
std::vector<at::Tensor> leaves(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  for (const auto& t : ts) out.push_back(t.detach().clone().requires_grad_(true));
  return out;
}

TEST(FusedOps, RmsNormMatchesTheComposedOpsInValueAndGradient) {
  for (auto dtype : {at::kFloat, at::kDouble}) {  // the CPU loop, then the generic path
    const double tol = 2e-5;                      // both compute in float32, as Llama does
    at::manual_seed(1);
    at::Tensor x0 = at::randn({3, 5, 13}, dtype), w0 = at::randn({13}, dtype),
               dy = at::randn({3, 5, 13}, dtype);
    auto a = leaves({x0, w0}), b = leaves({x0, w0});
    at::Tensor fused = fn::rms_norm_fused(a[0], a[1], 1e-5);
    at::Tensor xf = b[0].to(at::kFloat);
    at::Tensor composed = b[1] * (xf * at::rsqrt(xf.pow(2).mean(-1, true) + 1e-5)).to(dtype);
    EXPECT_LT(max_diff(fused, composed), tol);
    fused.backward(dy);
    composed.backward(dy);
    EXPECT_LT(max_diff(a[0].grad(), b[0].grad()), tol) << "dx " << dtype;
    EXPECT_LT(max_diff(a[1].grad(), b[1].grad()), tol * 10) << "dw " << dtype;
    // A frozen weight (LoRA training): only the input's gradient.
    at::Tensor x = x0.detach().clone().requires_grad_(true), w = w0.detach();
    fn::rms_norm_fused(x, w, 1e-5).backward(dy);
    EXPECT_LT(max_diff(x.grad(), b[0].grad()), tol);
    EXPECT_FALSE(w.grad().defined());
  }
  EXPECT_THROW_WITH(fn::rms_norm_fused(at::ones({2, 4}), at::ones({3}), 1e-5),
                    "[rms_norm] input has 4 features");
}

TEST(FusedOps, RopeMatchesTheComposedOpsInValueAndGradient) {
  at::manual_seed(4);
  const int64_t B = 2, T = 5, H = 3, D = 8;
  auto [cos, sin] = fn::rope_tables(at::arange(T, at::kLong).repeat({B, 1}) + 2, D, 10000.0);  // (B, 1, T, D)
  // x as the model makes it: the transposed view (B, H, T, D) of a projection's (B, T, H, D) output.
  at::Tensor proj = at::randn({B, T, H * D});
  at::Tensor dy = at::randn({B, H, T, D});
  auto a = leaves({proj}), b = leaves({proj});
  at::Tensor xa = a[0].view({B, T, H, D}).transpose(1, 2), xb = b[0].view({B, T, H, D}).transpose(1, 2);
  ASSERT_TRUE(fn::rope_fusable(xa, cos, sin));
  at::Tensor fused = fn::rope_fused(xa, cos, sin);
  at::Tensor rotated = at::cat({-xb.narrow(-1, D / 2, D / 2), xb.narrow(-1, 0, D / 2)}, -1);
  at::Tensor composed = xb * cos + rotated * sin;
  EXPECT_TRUE(at::equal(fused, composed));  // the same operations in the same order
  EXPECT_TRUE(fused.is_contiguous());
  fused.backward(dy);
  composed.backward(dy);
  EXPECT_LT(max_diff(a[0].grad(), b[0].grad()), 1e-6);
  EXPECT_TRUE(a[0].grad().is_contiguous());  // laid out as the projection's output: no copy on the way back
  // Not fusable: float64, or tables of another length; apply_rope then composes at:: ops.
  EXPECT_FALSE(fn::rope_fusable(xa.to(at::kDouble), cos, sin));
  EXPECT_FALSE(fn::rope_fusable(xa, cos.narrow(2, 0, T - 1), sin.narrow(2, 0, T - 1)));
  EXPECT_THROW_WITH(fn::rope_fused(xa.to(at::kDouble), cos, sin),
                    "[rope] fused rotary embeddings need float32");
  EXPECT_LT(max_diff(fn::apply_rope(xb.detach().to(at::kDouble), cos, sin).to(at::kFloat), composed), 1e-6);
}

TEST(FusedOps, SwigluMatchesTheComposedOpsInValueAndGradient) {
  for (auto dtype : {at::kFloat, at::kDouble}) {
    const double tol = dtype == at::kFloat ? 1e-5 : 1e-12;
    at::manual_seed(2);
    at::Tensor g0 = at::randn({4, 7, 9}, dtype) * 3, u0 = at::randn({4, 7, 9}, dtype),
               dy = at::randn({4, 7, 9}, dtype);
    auto a = leaves({g0, u0}), b = leaves({g0, u0});
    at::Tensor fused = fn::swiglu(a[0], a[1]), composed = at::silu(b[0]) * b[1];
    EXPECT_LT(max_diff(fused, composed), tol);
    fused.backward(dy);
    composed.backward(dy);
    EXPECT_LT(max_diff(a[0].grad(), b[0].grad()), tol) << "d gate " << dtype;
    EXPECT_LT(max_diff(a[1].grad(), b[1].grad()), tol) << "d up " << dtype;
  }
  EXPECT_THROW_WITH(fn::swiglu(at::ones({2, 4}), at::ones({2, 5})),
                    "[swiglu] gate [2, 4] and up [2, 5] differ");
}

// Drops `t` and says whether its memory went with it (no saved tensor holds its storage).
bool freed_when_dropped(at::Tensor& t) {
  c10::weak_intrusive_ptr<c10::StorageImpl> weak = t.storage().getWeakStorageImpl();
  t.reset();
  return weak.expired();
}

// RMSNorm's and SwiGLU's outputs, read by projections whose weights train, are freed after the forward
// pass: the projections' nodes rebuild them in backward (core/rebuild.h). Two projections of one norm
// output (q and k) share one rebuild. Every gradient equals the composition that keeps them.
TEST(FusedOps, NormAndSwigluOutputsAreRebuiltNotKept) {
  for (auto dtype : {at::kFloat, at::kDouble}) {  // the CPU loops, then the generic path
    at::manual_seed(5);
    const at::Tensor x0 = at::randn({2, 5, 8}, dtype), nw0 = at::randn({8}, dtype),
                     wq0 = at::randn({6, 8}, dtype), wk0 = at::randn({4, 8}, dtype),
                     wd0 = at::randn({8, 6}, dtype);
    auto a = leaves({x0, nw0, wq0, wk0, wd0}), b = leaves({x0, nw0, wq0, wk0, wd0});
    at::Tensor h = fn::rms_norm_fused(a[0], a[1], 1e-6);
    at::Tensor q = linear(h, a[2], at::Tensor()), k = linear(h, a[3], at::Tensor());  // (2, 5, 6), (2, 5, 4)
    EXPECT_TRUE(at::equal((*rebuild_of(h))(), h)) << dtype;  // the forward's values, to the last bit
    EXPECT_TRUE(freed_when_dropped(h)) << dtype;
    at::Tensor act = fn::swiglu(q, at::cat({k, k.narrow(-1, 0, 2)}, -1));  // (2, 5, 6)
    at::Tensor y = linear(act, a[4], at::Tensor());                        // (2, 5, 8)
    EXPECT_TRUE(at::equal((*rebuild_of(act))(), act)) << dtype;
    EXPECT_TRUE(freed_when_dropped(act)) << dtype;
    // The reference: the same ops through at::linear, which keeps its input.
    at::Tensor hr = fn::rms_norm_fused(b[0], b[1], 1e-6);
    at::Tensor qr = at::linear(hr, b[2]), kr = at::linear(hr, b[3]);
    at::Tensor ar = fn::swiglu(qr, at::cat({kr, kr.narrow(-1, 0, 2)}, -1));
    at::Tensor yr = at::linear(ar, b[4]);
    EXPECT_FALSE(freed_when_dropped(ar)) << dtype;
    EXPECT_TRUE(at::equal(y, yr)) << dtype;
    const at::Tensor dy = at::randn(y.sizes(), dtype);
    y.backward(dy);
    yr.backward(dy);
    for (size_t i = 0; i < a.size(); ++i)
      EXPECT_TRUE(at::allclose(a[i].grad(), b[i].grad(), 1e-5, 1e-6)) << dtype << " gradient " << i;
  }
}

// Attention as composed ops, each query head reading its own copy of its key/value head.
at::Tensor attention_composed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& bias) {
  const int64_t G = q.size(1) / k.size(1);
  at::Tensor s = at::matmul(q, k.repeat_interleave(G, 1).transpose(-1, -2)) / std::sqrt(double(q.size(-1)));
  if (bias.defined()) s = s + bias;
  return at::matmul(at::softmax(s, -1), v.repeat_interleave(G, 1));
}

// The attention node keeps q, k, v and the bias and computes the probabilities again in backward: output
// and gradients equal the composed ops for grouped and plain heads and every bias shape; a bias that
// learns takes the composed path and gets its gradient.
TEST(FusedOps, AttentionRecomputesItsProbabilitiesWithTheComposedGradients) {
  const int64_t B = 2, T = 5;
  for (auto dtype : {at::kFloat, at::kDouble})
    for (int64_t Hkv : {3, 1}) {
      at::manual_seed(6);
      const at::Tensor q0 = at::randn({B, 3, T, 4}, dtype), k0 = at::randn({B, Hkv, T, 4}, dtype),
                       v0 = at::randn({B, Hkv, T, 4}, dtype), dy = at::randn({B, 3, T, 4}, dtype);
      const at::Tensor causal = fn::attention_bias({}, B, T, 0, true, 0, dtype, at::kCPU);  // (B, 1, T, T)
      const at::Tensor padding =
          at::zeros({B, 1, 1, T}, dtype).index_fill_(3, at::tensor({int64_t(4)}), -1e9);
      const at::Tensor per_head = at::randn({1, 3, T, T}, dtype);
      for (const at::Tensor& bias : {causal, padding, per_head, at::Tensor()}) {
        const std::string label = std::string(c10::toString(dtype)) + " Hkv " + std::to_string(Hkv) +
                                  " bias " + (bias.defined() ? shape_str(bias.sizes().vec()) : "none");
        auto a = leaves({q0, k0, v0}), b = leaves({q0, k0, v0});
        at::Tensor got = fn::attention(a[0], a[1], a[2], bias),
                   want = attention_composed(b[0], b[1], b[2], bias);
        EXPECT_LT(max_diff(got, want), 1e-5) << label;
        got.backward(dy);
        want.backward(dy);
        for (size_t i = 0; i < 3; ++i)
          EXPECT_LT(max_diff(a[i].grad(), b[i].grad()), 1e-5) << label << " gradient " << i;
      }
      // A bias that learns (ALiBi-like): autograd through the same ops, so it gets its gradient too.
      auto a = leaves({q0, k0, v0, per_head}), b = leaves({q0, k0, v0, per_head});
      fn::attention(a[0], a[1], a[2], a[3]).backward(dy);
      attention_composed(b[0], b[1], b[2], b[3]).backward(dy);
      for (size_t i = 0; i < 4; ++i)
        EXPECT_LT(max_diff(a[i].grad(), b[i].grad()), 1e-5) << "learned bias " << i;
    }
  {
    // Under autocast the products run in bfloat16. Backward takes them in the forward's dtype whether
    // autocast is still on (backward inside the guard) or not (outside, as the trainer calls it).
    at::manual_seed(7);
    const at::Tensor q0 = at::randn({B, 4, T, 8}), k0 = at::randn({B, 2, T, 8}), v0 = at::randn({B, 2, T, 8}),
                     dy = at::randn({B, 4, T, 8});
    const at::Tensor causal = fn::attention_bias({}, B, T, 0, true, 0, at::kFloat, at::kCPU);
    auto a = leaves({q0, k0, v0}), b = leaves({q0, k0, v0}), c = leaves({q0, k0, v0});
    at::Tensor outside;
    {
      AutocastGuard bf16(at::kCPU, at::kBFloat16);
      at::Tensor inside = fn::attention(a[0], a[1], a[2], causal);
      EXPECT_EQ(inside.scalar_type(), at::kBFloat16);
      inside.backward(dy.to(at::kBFloat16));
      outside = fn::attention(b[0], b[1], b[2], causal);
    }
    outside.backward(dy.to(at::kBFloat16));
    attention_composed(c[0], c[1], c[2], causal).backward(dy);
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_TRUE(at::equal(a[i].grad(), b[i].grad())) << "bf16 gradient " << i;
      EXPECT_EQ(a[i].grad().scalar_type(), at::kFloat);
      EXPECT_LT(max_diff(a[i].grad(), c[i].grad()), 0.05 * c[i].grad().abs().max().item<double>()) << i;
    }
  }
  const at::Tensor q = at::zeros({1, 4, 3, 8}), k = at::zeros({1, 2, 3, 8});
  EXPECT_THROW_WITH(fn::attention(q, at::zeros({1, 3, 3, 8}), at::zeros({1, 3, 3, 8}), {}),
                    "4 query heads are not a multiple of 3 key/value heads");
  EXPECT_THROW_WITH(fn::attention(q, k, at::zeros({1, 2, 4, 8}), {}), "do not fit");
  EXPECT_THROW_WITH(fn::attention(q, k, k, at::zeros({1, 1, 3, 5})),
                    "[attention] bias [1, 1, 3, 5] does not fit 1 examples, 3 queries and 3 keys");
}

TEST(FusedOps, LinearCrossEntropyMatchesLogitsThenCrossEntropy) {
  for (auto dtype : {at::kFloat, at::kDouble}) {
    const double tol = dtype == at::kFloat ? 2e-5 : 1e-6;  // the fused op keeps logits in float32
    at::manual_seed(3);
    const int64_t N = 37, C = 11, V = 50;
    at::Tensor h0 = at::randn({N, C}, dtype), w0 = at::randn({V, C}, dtype), b0 = at::randn({V}, dtype);
    at::Tensor t = at::randint(0, V, {N}, at::kLong);
    t.index_put_({at::arange(0, N, 5)}, -100);  // every fifth row counts for nothing
    for (bool with_bias : {true, false}) {
      auto a = leaves({h0, w0, b0}), b = leaves({h0, w0, b0});
      // Chunks of 8 rows: several chunks and a short last one.
      at::Tensor fused = fn::linear_cross_entropy(a[0], a[1], with_bias ? a[2] : at::Tensor(), t, -100, 8);
      at::Tensor reference = at::cross_entropy_loss(at::linear(b[0], b[1], with_bias ? b[2] : at::Tensor()),
                                                    t, {}, at::Reduction::Mean, -100);
      EXPECT_LT(std::abs(fused.item<double>() - reference.item<double>()), tol);
      (fused * 3).backward();  // the loss's own gradient scales what the forward computed
      (reference * 3).backward();
      EXPECT_LT(max_diff(a[0].grad(), b[0].grad()), tol) << "dhidden";
      EXPECT_LT(max_diff(a[1].grad(), b[1].grad()), tol) << "dweight";
      if (with_bias) {
        EXPECT_LT(max_diff(a[2].grad(), b[2].grad()), tol) << "dbias";
      }
      EXPECT_EQ(a[0].grad().scalar_type(), dtype);
    }
    // A frozen projection (LoRA training): only dL/dhidden; without grad mode: the loss alone.
    at::Tensor h = h0.detach().clone().requires_grad_(true);
    fn::linear_cross_entropy(h, w0, {}, t).backward();
    EXPECT_TRUE(h.grad().defined());
    EXPECT_FALSE(w0.grad().defined());
    torch::NoGradGuard no_grad;
    const double plain = fn::linear_cross_entropy(h0, w0, {}, t).item<double>();
    EXPECT_NEAR(plain,
                at::cross_entropy_loss(at::linear(h0, w0), t, {}, at::Reduction::Mean, -100).item<double>(),
                tol);
  }
  at::Tensor h = at::randn({4, 3}), w = at::randn({6, 3});
  EXPECT_THROW_WITH(fn::linear_cross_entropy(h, w, {}, at::tensor({0, 1, 6, 2})),
                    "[lm_loss] targets must be in [0, 6)", "found 6");
  EXPECT_THROW_WITH(fn::linear_cross_entropy(h, at::randn({6, 5}), {}, at::zeros({4}, at::kLong)),
                    "[lm_loss] hidden (N, C) = [4, 3] and weight (V, C) = [6, 5] do not fit");
  EXPECT_THROW_WITH(fn::linear_cross_entropy(h, w, {}, at::zeros({5}, at::kLong)),
                    "targets must be (N) = (4)");
}

// The model's LM loss equals cross-entropy of its logits, in value and in every parameter's gradient,
// with the fused path (nothing at lm_head) and the whole-logits path (a LoRA at lm_head).
TEST(FusedOps, ModelLmLossEqualsCrossEntropyOfTheLogits) {
  for (bool lora_at_head : {false, true}) {
    Model m = load_model(test::tiny_checkpoint("llama"));
    ModuleSet set(m);
    ModuleConfig c;
    c.lora.r = 4;
    c.lora.init = "random";
    c.targets.target_modules =
        lora_at_head ? std::vector<std::string>{"q_proj", "lm_head"} : std::vector<std::string>{"q_proj"};
    set.add("lora", c);
    m->train();
    ModelInput in;
    in.input_ids = at::randint(0, m->config().vocab_size, {2, 9}, at::kLong);
    at::Tensor targets = at::randint(0, m->config().vocab_size, {2, 9}, at::kLong);
    targets.select(1, 8).fill_(-100);
    auto grads = [&] {
      std::vector<at::Tensor> g;
      for (auto& p : m->parameters()) {
        g.push_back(p.grad().defined() ? p.grad().clone() : at::zeros_like(p));
        if (p.grad().defined()) p.mutable_grad() = at::Tensor();
      }
      return g;
    };
    at::Tensor fused = m->lm_loss(in, targets);
    fused.backward();
    auto g1 = grads();
    at::Tensor logits = m->forward(in);
    at::Tensor reference = at::cross_entropy_loss(logits.reshape({-1, logits.size(2)}), targets.reshape({-1}),
                                                  {}, at::Reduction::Mean, -100);
    reference.backward();
    auto g2 = grads();
    EXPECT_NEAR(fused.item<double>(), reference.item<double>(), 1e-5) << "lora at head " << lora_at_head;
    double worst = 0;
    for (size_t i = 0; i < g1.size(); ++i) worst = std::max(worst, max_diff(g1[i], g2[i]));
    EXPECT_LT(worst, 1e-5) << "lora at head " << lora_at_head;
  }
  Model m = load_model(test::tiny_checkpoint("llama"));
  ModelInput in;
  in.input_ids = at::randint(0, m->config().vocab_size, {2, 5}, at::kLong);
  // Under bf16 autocast the logits are still float32 inside: close to the float32 loss, and a gradient.
  const double fp32 = m->lm_loss(in, in.input_ids).item<double>();
  at::Tensor bf16;
  {
    AutocastGuard autocast(m->device(), at::kBFloat16);
    bf16 = m->lm_loss(in, in.input_ids);
  }
  EXPECT_EQ(bf16.scalar_type(), at::kFloat);
  EXPECT_NEAR(bf16.item<double>(), fp32, 0.05 * fp32);
  bf16.backward();
  EXPECT_TRUE(m->token_embeddings().grad().defined());
  EXPECT_THROW_WITH(m->lm_loss(in, at::zeros({2, 4}, at::kLong)),
                    "[lm_loss] targets must be (batch, tokens) = [2, 5]");
  Model classifier = load_model(test::tiny_checkpoint("llama", "sequence_classification"));
  EXPECT_THROW_WITH(classifier->lm_loss(in, at::zeros({2, 5}, at::kLong)), "has no causal-LM head");
}

}  // namespace
}  // namespace mdl
