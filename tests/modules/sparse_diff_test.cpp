// Sparse fine-tuning: selection by change after a dense warm-up or by Fisher score, indices + values on
// disk, identity at start, training touches only the values, exact merge.
#include "mdl/modules/sparse_diff.h"

#include <ATen/ATen.h>
#include <torch/optim/sgd.h>
#include <torch/utils.h>

#include <filesystem>

#include "backbones/fixtures.h"
#include "mdl/modules/module_set.h"

namespace mdl {
namespace {

ModelInput batch() {
  ModelInput in;
  in.input_ids = at::arange(3, 15, at::kLong).view({2, 6});
  return in;
}

TEST(Sparse, SelectsTheLargestScores) {
  at::Tensor scores = at::tensor({0.1, 5.0, 0.3, 7.0, 0.2, 6.0, 0.0, 0.4}).view({2, 4});
  at::Tensor idx = select_top_indices(scores, 3.0 / 8);
  EXPECT_TRUE(at::equal(idx, at::tensor(std::vector<int64_t>{1, 3, 5})));
  EXPECT_EQ(select_top_indices(scores, 1e-6).numel(), 1);  // at least one entry
  EXPECT_THROW_WITH(select_top_indices(scores, 0), "density must be in (0, 1]");
}

TEST(Sparse, DenseWarmUpSelectionTrainingSaveLoadAndMerge) {
  const std::string dir = test::tiny_checkpoint("llama");
  Model base = load_model(dir), warm = load_model(dir);
  // A "warm-up" that moved three entries of one projection a lot and everything else a little.
  const std::string site = "model.layers.1.mlp.down_proj";
  {
    torch::NoGradGuard g;
    for (auto& p : warm->parameters()) p.add_(at::randn(p.sizes(), at::detail::createCPUGenerator(1)) * 1e-4);
    at::Tensor flat = warm->linear(site).weight.view({-1});
    for (int64_t i : {7, 300, 4000}) flat[i] += 1.0;
  }
  auto scores = change_scores(*base, *warm);
  ModuleSet set(base);
  ModuleConfig c;
  c.type = "sparse";
  c.sparse.density = 3.0 / (64 * 128);  // three entries of a (64, 128) weight
  c.targets.target_modules = {"mlp.down_proj"};
  c.targets.layers_to_transform = {1};
  set.add("s", c, scores);
  EXPECT_TRUE(
      at::equal(set.tensors("s").at(site + ".indices"), at::tensor(std::vector<int64_t>{7, 300, 4000})));
  set.freeze_base({"s"});
  EXPECT_EQ(set.summary().trainable, 3);

  torch::NoGradGuard outer;
  at::Tensor before = set.model()->forward(batch());
  {
    at::AutoGradMode enable(true);
    torch::optim::SGD opt(set.parameters({"s"}), torch::optim::SGDOptions(0.5));
    set.model()->forward(batch()).pow(2).mean().backward();
    opt.step();
  }
  at::Tensor after = set.model()->forward(batch());
  EXPECT_FALSE(at::equal(after, before));
  EXPECT_GT(set.tensors("s").at(site + ".values").abs().sum().item<double>(), 0);

  test::TempDir tmp;
  set.save("s", tmp / "s");
  EXPECT_LT(std::filesystem::file_size(tmp / "s/module.safetensors"), 1000u);  // 3 indices + 3 values
  ModuleSet other(load_model(dir));
  other.load(tmp / "s");
  EXPECT_TRUE(at::equal(other.model()->forward(batch()), after));

  set.merge("s");
  EXPECT_LE((set.model()->forward(batch()) - after).abs().max().item<double>(), 1e-6);
  set.unmerge("s");
  Model fresh = load_model(dir);
  EXPECT_LE((set.model()->linear(site).weight - fresh->linear(site).weight).abs().max().item<double>(), 1e-7);
}

TEST(Sparse, FisherScoresAndMissingSelection) {
  Model m = load_model(test::tiny_checkpoint("gpt2"));
  for (auto& p : m->parameters()) p.set_requires_grad(false);
  auto scores = fisher_scores(*m, 2, [&](int64_t i) { return m->forward(batch()).pow(2).mean() * (i + 1); });
  EXPECT_EQ(scores.at("transformer.h.0.attn.c_attn").sizes(),
            m->linear("transformer.h.0.attn.c_attn").weight.sizes());
  EXPECT_GT(scores.at("transformer.h.1.mlp.c_fc").sum().item<double>(), 0);
  EXPECT_GE(scores.at("transformer.h.1.mlp.c_fc").min().item<double>(), 0);
  for (auto& p : m->parameters()) EXPECT_FALSE(p.requires_grad());
  ModuleSet set(m);
  ModuleConfig c;
  c.type = "sparse";
  set.add("f", c, scores);  // all-linear by default, 1% of each weight
  EXPECT_EQ(set.sites("f").size(), 8u);
  ModuleConfig none;
  none.type = "sparse";
  EXPECT_THROW_WITH(set.add("g", none), "has no selection for", "change_scores");
}

}  // namespace
}  // namespace mdl
