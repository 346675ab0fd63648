// Merging: every method against hand-computed tensors, DARE's reproducibility and expectation, exact LoRA
// concatenation, SVD truncation error equal to the discarded singular values, module merges equal to the
// modules run together (scaling once, negative weights, mixed ranks, rsLoRA), streamed checkpoint merges.
#include "mdl/aggregation/merge.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <cmath>
#include <filesystem>

#include "backbones/fixtures.h"
#include "mdl/io/checkpoint.h"
#include "mdl/io/safetensors.h"
#include "mdl/modules/module_set.h"
#include "mdl/modules/peft_format.h"

namespace mdl {
namespace {

at::Tensor vec(std::vector<float> v) {
  return at::tensor(v);
}

void expect_near(const at::Tensor& got, std::vector<double> want, double tol = 1e-6) {
  ASSERT_EQ(got.numel(), static_cast<int64_t>(want.size()));
  for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i].item<double>(), want[i], tol) << "entry " << i;
}

MergeOptions opts(const std::string& method, std::vector<double> w = {}, double density = 1.0) {
  MergeOptions o;
  o.method = method;
  o.weights = std::move(w);
  o.density = density;
  return o;
}

TEST(MergeMethods, LinearAndTaskArithmetic) {
  expect_near(merge_tensors({vec({1, 2}), vec({3, 6})}, {}, opts("linear", {1, 3}), "x"), {2.5, 5});
  MergeOptions sum = opts("linear", {1, 3});
  sum.normalize = false;
  expect_near(merge_tensors({vec({1, 2}), vec({3, 6})}, {}, sum, "x"), {10, 20});
  // base + sum w_i (theta_i - base), a negative weight negates a task.
  expect_near(merge_tensors({vec({2, 3}), vec({0, 5})}, vec({1, 1}), opts("task_arithmetic", {1, -0.5}), "x"),
              {2.5, 1});
  // Averaging identical inputs gives that input.
  at::Tensor a = at::randn({5, 3});
  EXPECT_TRUE(at::allclose(merge_tensors({a, a, a}, {}, opts("linear"), "x"), a));
}

TEST(MergeMethods, TiesBothConventions) {
  // tau1 trims to [0,-2,3,0], tau2 to [-3,0,2,0]; weights 1, 2.
  std::vector<at::Tensor> taus = {vec({1, -2, 3, 0.5}), vec({-3, 1, 2, -0.1})};
  MergeOptions o = opts("ties", {1, 2}, 0.5);
  expect_near(merge_tensors(taus, {}, o, "x"), {-3, -2, 7.0 / 3, 0});  // divisor: agreeing weights
  o.convention = MergeConvention::peft;
  expect_near(merge_tensors(taus, {}, o, "x"), {-6, -2, 3.5, 0});  // divisor: agreeing count
  // With a base: base + lambda * merged.
  MergeOptions l = opts("ties", {1, 2}, 0.5);
  l.lambda = 0.5;
  expect_near(merge_tensors({vec({2, -1, 4, 1.5}), vec({-2, 2, 3, 0.9})}, vec({1, 1, 1, 1}), l, "x"),
              {1 - 1.5, 1 - 1, 1 + 7.0 / 6, 1});
  expect_near(trim_to_density(vec({0.1f, -5, 2, -0.3f}), 0.5), {0, -5, 2, 0});
  expect_near(merge_tensors({vec({1, -4}), vec({2, 1})}, {}, opts("magnitude_prune", {1, 1}, 0.5), "x"),
              {2, -4});
}

TEST(MergeMethods, DareIsReproducibleAndUnbiased) {
  at::Tensor tau = at::randn({400});
  at::Tensor a = dare(tau, 0.3, MergeConvention::peft, 7), b = dare(tau, 0.3, MergeConvention::peft, 7);
  EXPECT_TRUE(at::equal(a, b));
  EXPECT_FALSE(at::equal(a, dare(tau, 0.3, MergeConvention::peft, 8)));
  EXPECT_NEAR((a != 0).to(at::kFloat).mean().item<double>(), 0.3, 0.08);
  // PEFT: kept entries times 1/density exactly; mergekit: the L1 norm is kept.
  at::Tensor kept = a != 0;
  EXPECT_TRUE(at::allclose(a.masked_select(kept), tau.masked_select(kept) / 0.3));
  EXPECT_NEAR(dare(tau, 0.3, MergeConvention::mergekit, 7).abs().sum().item<double>(),
              tau.abs().sum().item<double>(), 1e-2);
  // Over many seeds the mean approaches the input.
  at::Tensor mean = at::zeros_like(tau);
  const int n = 3000;
  for (int s = 0; s < n; ++s) mean += dare(tau, 0.5, MergeConvention::peft, static_cast<uint64_t>(s));
  mean /= n;
  EXPECT_LT((mean - tau).abs().max().item<double>(), 0.2 * tau.abs().max().item<double>());
  EXPECT_LT((mean - tau).abs().mean().item<double>(), 0.03 * tau.abs().max().item<double>() + 0.02);
  // The merge-level seed depends on the tensor name, not the order of the stream.
  MergeOptions o = opts("dare_linear", {1, 1}, 0.5);
  o.seed = 3;
  EXPECT_TRUE(at::equal(merge_tensors({tau, tau}, {}, o, "w"), merge_tensors({tau, tau}, {}, o, "w")));
  EXPECT_FALSE(at::equal(merge_tensors({tau, tau}, {}, o, "w"), merge_tensors({tau, tau}, {}, o, "v")));
}

// Large tensors merge block by block with a bisected trim threshold: the same result as the whole-tensor
// path (a (1, N) view takes that path).
TEST(MergeMethods, BlockedMergeEqualsWholeTensorMerge) {
  auto gen = at::detail::createCPUGenerator(3);
  const at::Tensor base = at::randn({700, 600}, gen);
  std::vector<at::Tensor> in = {base + at::randn({700, 600}, gen), base + at::randn({700, 600}, gen),
                                base - 0.5 * at::randn({700, 600}, gen)};
  for (const std::string method : {"ties", "magnitude_prune", "task_arithmetic"}) {
    MergeOptions o = opts(method, {1, 0.5, 2}, 0.2);
    at::Tensor blocked = merge_tensors(in, base, o, "w");
    std::vector<at::Tensor> flat;
    for (const auto& t : in) flat.push_back(t.reshape({1, -1}));
    at::Tensor whole = merge_tensors(flat, base.reshape({1, -1}), o, "w").view({700, 600});
    EXPECT_TRUE(at::allclose(blocked, whole, 1e-5, 1e-6)) << method << " " << (blocked - whole).abs().max();
  }
}

TEST(MergeMethods, Slerp) {
  MergeOptions o = opts("slerp");
  expect_near(merge_tensors({vec({1, 0}), vec({0, 1})}, {}, o, "x"), {std::sqrt(0.5), std::sqrt(0.5)});
  o.t = 0.25;
  expect_near(merge_tensors({vec({1, 0}), vec({0, 1})}, {}, o, "x"),
              {std::cos(M_PI / 8), std::sin(M_PI / 8)});
  expect_near(merge_tensors({vec({1, 1}), vec({2, 2})}, {}, o, "x"), {1.25, 1.25});  // parallel: linear
}

TEST(MergeMethods, InvalidOptionsAreRefused) {
  EXPECT_THROW_WITH(validate(opts("average"), 2), "[merge] unknown method 'average'", "task_arithmetic");
  EXPECT_THROW_WITH(validate(opts("linear", {1}), 2), "1 weights for 2 inputs");
  EXPECT_THROW_WITH(validate(opts("ties", {}, 0.0), 2), "density must be in (0, 1], got 0");
  EXPECT_THROW_WITH(validate(opts("slerp"), 3), "slerp interpolates exactly 2 inputs, got 3");
  EXPECT_THROW_WITH(validate(opts("linear", {1, -1}), 2), "sum of the weights, which is 0");
  EXPECT_THROW_WITH(merge_tensors({vec({1, 2}), vec({1, 2, 3})}, {}, opts("linear"), "w"),
                    "'w': input 2 has shape [3]");
}

TEST(LoraMerge, CatIsExactAndSvdErrorIsTheDiscardedSpectrum) {
  auto gen = at::detail::createCPUGenerator(1);
  LoraFactors a{at::randn({2, 6}, gen), at::randn({5, 2}, gen), 4.0};
  LoraFactors b{at::randn({3, 6}, gen), at::randn({5, 3}, gen), 0.5};
  LoraFactors c = lora_cat({a, b}, {0.7, -1.5});
  EXPECT_EQ(c.A.size(0), 5);
  at::Tensor want = 0.7 * 4.0 * a.B.mm(a.A) - 1.5 * 0.5 * b.B.mm(b.A);
  EXPECT_TRUE(at::allclose(c.scaling * c.B.mm(c.A), want, 1e-5, 1e-5));
  at::Tensor delta = at::randn({7, 9}, gen);
  SvdFactors f = lora_svd(delta, 3);
  at::Tensor S = at::linalg_svdvals(delta.to(at::kDouble));
  const double discarded = S.narrow(0, 3, S.size(0) - 3).pow(2).sum().item<double>();
  EXPECT_NEAR(f.error, std::sqrt(discarded), 1e-9);
  EXPECT_NEAR((delta - f.factors.B.mm(f.factors.A)).norm().item<double>(), std::sqrt(discarded), 1e-4);
  EXPECT_NEAR(f.discarded_energy, discarded / S.pow(2).sum().item<double>(), 1e-9);
  EXPECT_NEAR(lora_svd(delta, 7).error, 0.0, 1e-9);
}

at::Tensor logits(ModelImpl& m) {
  ModelInput in;
  in.input_ids = at::arange(3, 19, at::kLong).view({2, 8});
  return m.forward(in);
}

// Two LoRA modules of different ranks (one rsLoRA, on partly different sites) merged with cat and svd
// equal the two modules applied together with the same weights: scaling once, B weighted, sign kept.
TEST(LoraMerge, ModuleMergesEqualTheModulesTogether) {
  const std::string model = test::tiny_checkpoint("llama");
  test::TempDir tmp;
  {
    ModuleSet set(load_model(model));
    ModuleConfig a;
    a.lora.r = 2, a.lora.alpha = 8, a.lora.init = "random";
    a.targets.target_modules = {"q_proj", "v_proj"};
    ModuleConfig b;
    b.lora.r = 4, b.lora.alpha = 2, b.lora.use_rslora = true, b.lora.init = "random";
    b.targets.target_modules = {"v_proj", "down_proj"};
    b.seed = 5;
    set.add("a", a);
    set.add("b", b);
    set.save("a", tmp / "a");
    set.save("b", tmp / "b");
    write_peft(set, "a", tmp / "peft_a");
    write_peft(set, "b", tmp / "peft_b");
  }
  torch::NoGradGuard g;
  ModuleSet both(load_model(model));
  both.load(tmp / "a");
  both.load(tmp / "b");
  both.set_scale("a", 0.6);
  both.set_scale("b", -1.2);
  const at::Tensor want = logits(*both.model());
  for (const std::string method : {"cat", "svd"}) {
    MergeOptions o = opts(method, {0.6, -1.2});
    o.rank = method == "svd" ? 6 : 0;  // 2 + 4: nothing discarded
    MergeReport r = merge_modules(model, {tmp / "a", tmp / "b"}, o, tmp / ("m_" + method));
    EXPECT_EQ(r.format, "native");
    ModuleSet merged(load_model(model));
    merged.load(tmp / ("m_" + method));
    EXPECT_TRUE(at::allclose(logits(*merged.model()), want, 1e-4, 1e-4)) << method;
    if (method == "svd") {
      EXPECT_LT(r.max_discarded_energy, 1e-9);
    }
  }
  // PEFT inputs give a PEFT output with the same result.
  MergeReport r =
      merge_modules(model, {tmp / "peft_a", tmp / "peft_b"}, opts("cat", {0.6, -1.2}), tmp / "m_peft");
  EXPECT_EQ(r.format, "peft");
  EXPECT_TRUE(std::filesystem::exists(tmp / "m_peft/adapter_config.json"));
  ModuleSet merged(load_model(model));
  merged.load(tmp / "m_peft");
  EXPECT_TRUE(at::allclose(logits(*merged.model()), want, 1e-4, 1e-4));
  // A lower rank discards energy and says how much.
  MergeOptions low = opts("svd", {0.6, -1.2});
  low.rank = 1;
  r = merge_modules(model, {tmp / "a", tmp / "b"}, low, tmp / "m_low");
  EXPECT_GT(r.max_discarded_energy, 0.0);
  EXPECT_EQ(r.rank, 1);
  // TIES over the deltas, factorised back.
  r = merge_modules(model, {tmp / "a", tmp / "b"}, opts("ties", {1, 1}, 0.5), tmp / "m_ties");
  EXPECT_EQ(r.rank, 4);
}

TEST(CheckpointMerge, StreamedLinearAndTiesEqualTheTensorFormulas) {
  test::TempDir tmp;
  std::vector<std::string> dirs;
  for (int s = 0; s < 3; ++s) {
    InitModelOptions o;
    o.arch = "llama";
    o.seed = static_cast<uint64_t>(20 + s);
    dirs.push_back(tmp / ("m" + std::to_string(s)));
    init_model(o, dirs.back());
  }
  MergeReport r = merge_checkpoints({dirs[1], dirs[2]}, "", opts("linear", {1, 3}), tmp / "lin");
  EXPECT_EQ(r.format, "checkpoint");
  auto m1 = io::load_safetensors(dirs[1] + "/model.safetensors"),
       m2 = io::load_safetensors(dirs[2] + "/model.safetensors");
  auto lin = io::load_safetensors(tmp / "lin/model.safetensors");
  EXPECT_EQ(lin.size(), m1.size());
  for (const auto& [name, t] : lin)
    EXPECT_TRUE(at::allclose(t, (m1.at(name) + 3 * m2.at(name)) / 4, 1e-6, 1e-6)) << name;
  EXPECT_NO_THROW(load_model(tmp / "lin"));  // config and tokenizer copied: a loadable checkpoint
  MergeOptions ties = opts("ties", {1, 1}, 0.3);
  merge_checkpoints({dirs[1], dirs[2]}, dirs[0], ties, tmp / "ties");
  auto base = io::load_safetensors(dirs[0] + "/model.safetensors");
  auto got = io::load_safetensors(tmp / "ties/model.safetensors");
  const std::string w = "model.layers.0.self_attn.q_proj.weight";
  EXPECT_TRUE(at::allclose(got.at(w), merge_tensors({m1.at(w), m2.at(w)}, base.at(w), ties, w)));
  EXPECT_THROW_WITH(
      merge_checkpoints({dirs[1], test::tiny_checkpoint("gpt2")}, "", opts("linear"), tmp / "bad"), "[merge]",
      "has no tensor");
  EXPECT_FALSE(std::filesystem::exists(tmp / "bad/model.safetensors"));
}

}  // namespace
}  // namespace mdl
