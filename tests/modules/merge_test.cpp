// Merging into the base weights: merged forward equals unmerged, and unmerge restores the base.
#include <ATen/ATen.h>
#include <torch/optim/sgd.h>
#include <torch/utils.h>

#include <nlohmann/json.hpp>

#include "backbones/fixtures.h"
#include "mdl/modules/module_set.h"

namespace mdl {
namespace {

at::Tensor logits(ModelImpl& m) {
  torch::NoGradGuard g;
  ModelInput in;
  in.input_ids = at::arange(3, 15, at::kLong).view({2, 6});
  return m.forward(in);
}

class Merge : public ::testing::TestWithParam<std::pair<std::string, nlohmann::json>> {};

TEST_P(Merge, MergedEqualsUnmergedAndUnmergeRestores) {
  ModuleSet set(load_model(test::tiny_checkpoint(GetParam().first)));
  std::map<std::string, at::Tensor> original;
  for (const auto& item : set.model()->named_parameters())
    original[item.key()] = item.value().detach().clone();
  set.add("m", GetParam().second.get<ModuleConfig>());
  // Train a step so every part (DoRA's magnitude, the bias) is non-trivial.
  set.freeze_base({"m"});
  torch::optim::SGD opt(set.parameters({"m"}), torch::optim::SGDOptions(0.05));
  {
    ModelInput in;
    in.input_ids = at::arange(3, 15, at::kLong).view({2, 6});
    set.model()->forward(in).pow(2).mean().backward();
    opt.step();
  }
  at::Tensor unmerged = logits(*set.model());
  set.merge("m");
  EXPECT_TRUE(set.merged("m"));
  at::Tensor merged = logits(*set.model());
  const double scale = unmerged.abs().max().item<double>();
  const double d = (merged - unmerged).abs().max().item<double>();
  std::printf("[merge %s] max |merged - unmerged| = %.3g (logits scale %.3g)\n",
              GetParam().second.dump().c_str(), d, scale);
  EXPECT_LE(d, 1e-5 * std::max(1.0, scale));
  bool weights_changed = false;
  for (const auto& item : set.model()->named_parameters())
    weights_changed = weights_changed || !at::equal(item.value(), original.at(item.key()));
  EXPECT_TRUE(weights_changed);
  set.unmerge("m");
  double worst = 0;
  for (const auto& item : set.model()->named_parameters())
    worst = std::max(worst, (item.value() - original.at(item.key())).abs().max().item<double>());
  EXPECT_LE(worst, 1e-6) << "unmerge must restore the base weights";
  EXPECT_LE((logits(*set.model()) - unmerged).abs().max().item<double>(), 1e-5 * std::max(1.0, scale));
  EXPECT_THROW_WITH(set.unmerge("m"), "is not merged");
}

using nlohmann::json;
INSTANTIATE_TEST_SUITE_P(
    Types, Merge,
    ::testing::Values(
        std::make_pair(std::string("llama"),
                       json{{"type", "lora"}, {"options", {{"init_lora_weights", false}}}}),
        std::make_pair(std::string("gpt2"),
                       json{{"type", "lora"},
                            {"options", {{"init_lora_weights", false}, {"lora_bias", true}}},
                            {"targets", {{"target_modules", "all-linear"}}}}),
        std::make_pair(std::string("llama"),
                       json{{"type", "lora"},
                            {"options",
                             {{"init_lora_weights", false}, {"use_dora", true}, {"use_rslora", true}}}}),
        std::make_pair(std::string("llama"),
                       json{{"type", "ia3"}, {"options", {{"init_ia3_weights", false}}}}),
        std::make_pair(std::string("bert"),
                       json{{"type", "ia3"}, {"options", {{"init_ia3_weights", false}}}}),
        std::make_pair(std::string("gpt2"), json{{"type", "bitfit"}}),
        std::make_pair(std::string("gpt2"), json{{"type", "layernorm"}})));

}  // namespace
}  // namespace mdl
