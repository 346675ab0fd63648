// AdapterHub directories: written with AdapterHub's key names, read back identically; one built by hand
// from AdapterHub's layout gives the LoRA equations' outputs; unsupported variants are refused by reason.
#include "mdl/modules/adapterhub_format.h"

#include <ATen/ATen.h>
#include <torch/optim/sgd.h>
#include <torch/utils.h>

#include <nlohmann/json.hpp>

#include "backbones/fixtures.h"
#include "backbones/reference.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/safetensors.h"
#include "mdl/modules/module_set.h"

namespace mdl {
namespace {

at::Tensor run(ModelImpl& m) {
  torch::NoGradGuard g;
  ModelInput in;
  in.input_ids = at::arange(5, 13, at::kLong).view({1, -1});
  return m.forward(in);
}

struct Case {
  std::string arch;
  nlohmann::json config;
  std::string expected_key;
};

class AdapterHubRoundTrip : public ::testing::TestWithParam<Case> {};

TEST_P(AdapterHubRoundTrip, KeysAndOutputsSurvive) {
  const std::string dir = test::tiny_checkpoint(GetParam().arch);
  ModuleSet set(load_model(dir));
  set.add("a", GetParam().config.get<ModuleConfig>());
  set.freeze_base({"a"});
  {  // a training step, so every tensor is non-trivial
    torch::optim::SGD opt(set.parameters({"a"}), torch::optim::SGDOptions(0.5));
    ModelInput in;
    in.input_ids = at::arange(5, 13, at::kLong).view({1, -1});
    set.model()->forward(in).pow(2).mean().backward();
    opt.step();
  }
  test::TempDir tmp;
  write_adapterhub(set, "a", tmp / "hub");
  EXPECT_TRUE(is_adapterhub_dir(tmp / "hub"));
  auto keys = io::load_safetensors(tmp / "hub/adapter.safetensors");
  EXPECT_TRUE(keys.count(GetParam().expected_key))
      << "missing " << GetParam().expected_key << "; first key " << keys.begin()->first;
  ModuleSet other(load_model(dir));
  other.load(tmp / "hub", "a");
  EXPECT_EQ(other.sites("a"), set.sites("a"));
  EXPECT_TRUE(at::equal(run(*other.model()), run(*set.model())));
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, AdapterHubRoundTrip,
    ::testing::Values(Case{"llama",
                           {{"type", "adapter"}, {"options", {{"config", "houlsby"}}}},
                           "model.layers.0.attention_adapters.adapters.a.adapter_down.0.weight"},
                      Case{"gpt2",
                           {{"type", "adapter"}, {"options", {{"reduction_factor", 4}}}},
                           "transformer.h.1.output_adapters.adapters.a.adapter_up.weight"},
                      Case{"bert",
                           {{"type", "adapter"}, {"options", {{"config", "houlsby"}, {"layer_norm", true}}}},
                           "bert.encoder.layer.0.attention.output.adapters.a.adapter_down.1.weight"},
                      Case{"bert",
                           {{"type", "adapter"}, {"options", {{"config", "parallel"}, {"scaling", 2.0}}}},
                           "bert.encoder.layer.1.output.adapters.a.adapter_down.0.bias"},
                      Case{"llama",
                           {{"type", "lora"}, {"options", {{"r", 4}, {"lora_alpha", 16}}}},
                           "model.layers.1.self_attn.v_proj.loras.a.lora_B"}));

TEST(AdapterHub, HandBuiltLoraMatchesTheEquations) {
  const std::string base = test::tiny_checkpoint("bert");
  Model model = load_model(base);
  const ModelConfig& c = model->config();
  test::TempDir dir;
  io::write_text_atomic(dir / "adapter_config.json", nlohmann::json{{"config",
                                                                     {{"architecture", "lora"},
                                                                      {"r", 2},
                                                                      {"alpha", 6},
                                                                      {"attn_matrices", {"q", "v"}},
                                                                      {"composition_mode", "add"},
                                                                      {"selfattn_lora", true}}},
                                                                    {"hidden_size", c.hidden_size},
                                                                    {"model_type", "bert"},
                                                                    {"name", "sst"},
                                                                    {"version", "adapters.1.0.0"}}
                                                         .dump());
  auto w = reference::load(base, "bert.");
  auto gen = at::detail::createCPUGenerator(8);
  std::map<std::string, at::Tensor> tensors;
  for (int l = 0; l < c.n_layer; ++l)
    for (const std::string m : {"query", "value"}) {
      const std::string module = "bert.encoder.layer." + std::to_string(l) + ".attention.self." + m;
      at::Tensor A = at::randn({2, c.hidden_size}, gen) * 0.3, B = at::randn({c.hidden_size, 2}, gen) * 0.3;
      tensors[module + ".loras.sst.lora_A"] = A;
      tensors[module + ".loras.sst.lora_B"] = B;
      w.t.at(module + ".weight") = w.t.at(module + ".weight") + 3.0 * B.mm(A);  // alpha / r = 3
    }
  io::save_safetensors(dir / "adapter.safetensors", tensors);
  ModuleSet set(model);
  set.load(dir.path(), "sst");
  at::Tensor ids = at::arange(5, 13, at::kLong);
  const double d = (run(*model)[0] - reference::bert_classify(w, c, ids)).abs().max().item<double>();
  std::printf("[adapterhub lora] max |mdl - equations| = %.3g\n", d);
  EXPECT_LE(d, 1e-4);
}

TEST(AdapterHub, UnsupportedVariantsAreRefusedWithTheReason) {
  Model model = load_model(test::tiny_checkpoint("llama"));
  ModuleSet set(model);
  test::TempDir dir;
  io::write_text_atomic(
      dir / "adapter_config.json",
      R"({"config": {"architecture": "bottleneck", "reduction_factor": 16, "original_ln_before": true}, "name": "x"})");
  io::save_safetensors(dir / "adapter.safetensors",
                       {{"model.layers.0.output_adapters.adapters.x.adapter_up.bias", at::zeros({64})}});
  EXPECT_THROW_WITH(set.load(dir.path()), "original_ln_before=true", "not supported yet");
  io::write_text_atomic(dir / "adapter_config.json",
                        R"({"config": {"architecture": "prefix_tuning"}, "name": "x"})");
  EXPECT_THROW_WITH(set.load(dir.path()), "architecture 'prefix_tuning' is not supported");
  io::write_text_atomic(dir / "adapter_config.json",
                        R"({"config": {"architecture": "lora"}, "name": "x", "hidden_size": 99})");
  EXPECT_THROW_WITH(set.load(dir.path()), "hidden_size 99", "another base model");
  std::filesystem::remove(dir / "adapter.safetensors");
  test::write_file(dir / "pytorch_adapter.bin", "pickle");
  EXPECT_THROW_WITH(set.load(dir.path()), "pytorch_adapter.bin");
  EXPECT_TRUE(set.names().empty());
}

}  // namespace
}  // namespace mdl
