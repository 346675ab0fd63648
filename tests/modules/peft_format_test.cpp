// PEFT directories: one built by hand from PEFT's documented layout gives the LoRA equations' outputs;
// what mdl writes reads back identically.
#include "mdl/modules/peft_format.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "backbones/fixtures.h"
#include "backbones/reference.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/safetensors.h"

namespace mdl {
namespace {

at::Tensor ids() {
  return at::arange(4, 16, at::kLong);
}

at::Tensor logits(ModelImpl& m) {
  torch::NoGradGuard g;
  ModelInput in;
  in.input_ids = ids().view({1, -1});
  return m.forward(in)[0];
}

TEST(Peft, HandBuiltLoraDirectoryMatchesTheEquations) {
  const std::string base = test::tiny_checkpoint("llama");
  Model model = load_model(base);
  const ModelConfig& c = model->config();
  for (bool rslora : {false, true}) {
    test::TempDir dir;
    const int64_t r = 4;
    const double alpha = 8;
    nlohmann::json config = {{"peft_type", "LORA"},
                             {"r", r},
                             {"lora_alpha", alpha},
                             {"use_rslora", rslora},
                             {"target_modules", {"q_proj", "v_proj"}},
                             {"task_type", "CAUSAL_LM"},
                             {"some_future_field", {{"ignored", true}}}};
    io::write_text_atomic(dir / "adapter_config.json", config.dump());
    auto gen = at::detail::createCPUGenerator(rslora ? 2 : 1);
    std::map<std::string, at::Tensor> tensors;
    auto w = reference::load(base, "model.");
    const double s = rslora ? alpha / std::sqrt(double(r)) : alpha / r;
    for (int l = 0; l < c.n_layer; ++l) {
      for (const std::string proj : {"q_proj", "v_proj"}) {
        const std::string module = "model.layers." + std::to_string(l) + ".self_attn." + proj;
        const int64_t out = model->site(module).info().out_features;
        at::Tensor A = at::randn({r, c.hidden_size}, gen) * 0.3, B = at::randn({out, r}, gen) * 0.3;
        tensors["base_model.model." + module + ".lora_A.weight"] = A;
        tensors["base_model.model." + module + ".lora_B.weight"] = B;
        // The equations, applied to the reference's weights: W' = W + s B A.
        w.t.at(module + ".weight") = w.t.at(module + ".weight") + s * B.mm(A);
      }
    }
    io::save_safetensors(dir / "adapter_model.safetensors", tensors);
    ModuleSet set(model);
    const std::string name = set.load(dir.path(), "peft");
    EXPECT_EQ(set.config(name).lora.use_rslora, rslora);
    at::Tensor want = reference::llama(w, c, ids());
    const double d = (logits(*model) - want).abs().max().item<double>();
    std::printf("[peft lora rslora=%d] max |mdl - equations| = %.3g\n", rslora, d);
    EXPECT_LE(d, 1e-4);
    set.remove(name);
  }
}

TEST(Peft, Gpt2Conv1DAdapterUsesRankByInAndOutByRank) {
  const std::string base = test::tiny_checkpoint("gpt2");
  Model model = load_model(base);
  const int64_t C = model->config().hidden_size, r = 2;
  test::TempDir dir;
  io::write_text_atomic(
      dir / "adapter_config.json",
      R"({"peft_type":"LORA","r":2,"lora_alpha":4,"target_modules":["c_attn"],"fan_in_fan_out":true})");
  auto gen = at::detail::createCPUGenerator(3);
  auto w = reference::load(base, "transformer.");
  std::map<std::string, at::Tensor> tensors;
  for (int l = 0; l < model->config().n_layer; ++l) {
    const std::string module = "transformer.h." + std::to_string(l) + ".attn.c_attn";
    at::Tensor A = at::randn({r, C}, gen) * 0.3, B = at::randn({3 * C, r}, gen) * 0.3;
    tensors["base_model.model." + module + ".lora_A.weight"] = A;
    tensors["base_model.model." + module + ".lora_B.weight"] = B;
    w.t.at(module + ".weight") = w.t.at(module + ".weight") + (2.0 * B.mm(A)).t();  // Conv1D stores (in, out)
  }
  io::save_safetensors(dir / "adapter_model.safetensors", tensors);
  ModuleSet set(model);
  set.load(dir.path(), "p");
  EXPECT_LE((logits(*model) - reference::gpt2(w, model->config(), ids())).abs().max().item<double>(), 1e-4);
}

class PeftRoundTrip : public ::testing::TestWithParam<nlohmann::json> {};

TEST_P(PeftRoundTrip, WrittenAndReadBackIdentically) {
  const std::string base = test::tiny_checkpoint("llama");
  ModuleSet set(load_model(base));
  set.add("m", GetParam().get<ModuleConfig>());
  test::TempDir dir;
  write_peft(set, "m", dir / "peft");
  auto cfg = nlohmann::json::parse(io::read_text(dir / "peft/adapter_config.json"));
  EXPECT_TRUE(cfg["peft_type"] == "LORA" || cfg["peft_type"] == "IA3");
  for (const auto& [k, t] : io::load_safetensors(dir / "peft/adapter_model.safetensors"))
    EXPECT_EQ(k.rfind("base_model.model.model.layers.", 0), 0u) << k;
  ModuleSet other(load_model(base));
  other.load(dir / "peft", "m");
  EXPECT_EQ(other.sites("m"), set.sites("m"));
  for (const auto& [k, t] : set.tensors("m")) EXPECT_TRUE(at::equal(t, other.tensors("m").at(k))) << k;
  EXPECT_TRUE(at::equal(logits(*set.model()), logits(*other.model())));
}

INSTANTIATE_TEST_SUITE_P(
    Types, PeftRoundTrip,
    ::testing::Values(
        nlohmann::json{
            {"type", "lora"},
            {"options", {{"init_lora_weights", false}, {"r", 4}, {"rank_pattern", {{"v_proj", 2}}}}}},
        nlohmann::json{{"type", "lora"},
                       {"options", {{"init_lora_weights", false}, {"use_dora", true}, {"lora_alpha", 32}}},
                       {"targets", {{"target_modules", {"q_proj", "down_proj"}}}}},
        nlohmann::json{{"type", "lora"}, {"options", {{"init_lora_weights", false}, {"lora_bias", true}}}},
        nlohmann::json{{"type", "ia3"}, {"options", {{"init_ia3_weights", false}}}}));

TEST(Peft, BadDirectoriesAreRefusedWithReasons) {
  Model model = load_model(test::tiny_checkpoint("llama"));
  ModuleSet set(model);
  test::TempDir dir;
  io::write_text_atomic(dir / "adapter_config.json", R"({"r": 4})");
  EXPECT_THROW_WITH(set.load(dir.path()), "no string field 'peft_type'");
  io::write_text_atomic(dir / "adapter_config.json", R"({"peft_type": "PROMPT_TUNING_XL"})");
  EXPECT_THROW_WITH(set.load(dir.path()), "peft_type 'PROMPT_TUNING_XL' is not supported");
  io::write_text_atomic(dir / "adapter_config.json", R"({"peft_type": "LORA", "r": 2})");
  EXPECT_THROW_WITH(set.load(dir.path()), "no adapter_model.safetensors");
  io::save_safetensors(dir / "adapter_model.safetensors",
                       {{"base_model.model.transformer.h.0.attn.c_attn.lora_A.weight", at::zeros({2, 64})}});
  EXPECT_THROW_WITH(set.load(dir.path()), "targets 'transformer.h.0.attn.c_attn'", "another base model");
  io::save_safetensors(
      dir / "adapter_model.safetensors",
      {{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", at::zeros({2, 64})},
       {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", at::zeros({99, 2})}});
  EXPECT_THROW_WITH(set.load(dir.path()), "q_proj.lora_B", "[99, 2]", "[64, 2]");
  EXPECT_TRUE(set.names().empty());
  set.add("ad", nlohmann::json{{"type", "adapter"}}.get<ModuleConfig>());
  EXPECT_THROW_WITH(write_peft(set, "ad", dir / "x"), "adapter module", "native format");
}

}  // namespace
}  // namespace mdl
