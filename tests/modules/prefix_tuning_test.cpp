// Prefix tuning: a prefix equal to the keys/values real tokens leave in the KV cache reproduces decoding
// after those tokens; MLP reparameterisation trains and folds away; files (native, PEFT).
#include "mdl/modules/prefix_tuning.h"

#include <ATen/ATen.h>
#include <torch/optim/sgd.h>
#include <torch/utils.h>

#include <nlohmann/json.hpp>

#include "backbones/fixtures.h"
#include "mdl/backbones/generate.h"
#include "mdl/io/atomic_file.h"
#include "mdl/modules/module_set.h"
#include "mdl/modules/peft_format.h"

namespace mdl {
namespace {

class Prefix : public ::testing::TestWithParam<std::string> {};

TEST_P(Prefix, EqualsACacheOfRealTokens) {
  ModuleSet set(load_model(test::tiny_checkpoint(GetParam())));
  const ModelConfig& c = set.model()->config();
  const std::vector<int64_t> prefix_ids = {21, 22, 23, 24};
  const int64_t n = 4, kv = c.n_kv_head * c.head_dim;
  torch::NoGradGuard g;
  // The base model's cache after reading the prefix tokens: per layer (1, Hkv, n, D).
  KVCache cache;
  ModelInput first;
  first.input_ids = at::tensor(prefix_ids).view({1, -1});
  first.cache = &cache;
  set.model()->forward(first);
  const std::vector<at::Tensor> prefix_k = cache.k,
                                prefix_v = cache.v;  // before the real tokens are appended
  at::Tensor ids = at::arange(30, 36, at::kLong).view({1, -1});
  ModelInput rest;
  rest.input_ids = ids;
  rest.cache = &cache;
  at::Tensor want = set.model()->forward(rest);  // (1, 6, V): real tokens at positions n..n+5

  ModuleConfig pc;
  pc.type = "prefix";
  pc.prefix.num_virtual_tokens = n;
  set.add("p", pc);
  // PEFT's layout (n, L * 2 * Hkv * D): slot 2l = keys of layer l, 2l + 1 = its values.
  at::Tensor table = at::empty({n, c.n_layer * 2, c.n_kv_head, c.head_dim});
  for (int64_t l = 0; l < c.n_layer; ++l) {
    table.select(1, 2 * l).copy_(prefix_k[l][0].permute({1, 0, 2}));
    table.select(1, 2 * l + 1).copy_(prefix_v[l][0].permute({1, 0, 2}));
  }
  auto tensors = set.tensors("p");
  ASSERT_EQ(tensors.size(), 1u);
  tensors.begin()->second.copy_(table.view({n, -1}));
  EXPECT_EQ(tensors.begin()->second.size(1), c.n_layer * 2 * kv);
  ModelInput in;
  in.input_ids = ids;
  at::Tensor got = set.model()->forward(in);
  const double d = (got - want).abs().max().item<double>();
  std::printf("[prefix %s] max |prefix - cached real tokens| = %.3g\n", GetParam().c_str(), d);
  EXPECT_LE(d, 1e-5);
  in.attention_mask = at::ones({1, 6}, at::kLong);  // a mask without the prefix columns
  EXPECT_LE((set.model()->forward(in) - want).abs().max().item<double>(), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Archs, Prefix, ::testing::Values("gpt2", "llama"));

TEST(PrefixTuning, ProjectionTrainsFoldsAndRoundTrips) {
  const std::string dir = test::tiny_checkpoint("llama");
  ModuleSet set(load_model(dir));
  const ModelConfig& c = set.model()->config();
  ModuleConfig pc;
  pc.type = "prefix";
  pc.prefix.num_virtual_tokens = 3;
  pc.prefix.prefix_projection = true;
  pc.prefix.encoder_hidden_size = 16;
  set.add("p", pc);
  set.freeze_base({"p"});
  const int64_t C = c.hidden_size, out = c.n_layer * 2 * c.n_kv_head * c.head_dim;
  EXPECT_EQ(set.summary().trainable, 3 * C + (C * 16 + 16) + (16 * out + out));
  ModelInput in;
  in.input_ids = at::arange(3, 15, at::kLong).view({2, 6});
  torch::optim::SGD opt(set.parameters({"p"}), torch::optim::SGDOptions(0.5));
  set.model()->forward(in).pow(2).mean().backward();
  opt.step();
  for (const auto& p : set.model()->parameters()) EXPECT_FALSE(p.grad().defined());
  torch::NoGradGuard g;
  at::Tensor before = set.model()->forward(in);
  set.fold("p");
  EXPECT_FALSE(set.config("p").prefix.prefix_projection);
  EXPECT_LE((set.model()->forward(in) - before).abs().max().item<double>(), 1e-6);
  EXPECT_EQ(set.summary().trainable, 3 * out);

  GenerateOptions o;
  o.max_tokens = 8;
  o.stop_token_ids = {-1};
  auto cached = generate(*set.model(), {5, 6, 7}, o);
  o.use_cache = false;
  EXPECT_EQ(generate(*set.model(), {5, 6, 7}, o).tokens, cached.tokens);

  test::TempDir tmp;
  set.save("p", tmp / "native");
  write_peft(set, "p", tmp / "peft");
  EXPECT_EQ(nlohmann::json::parse(io::read_text(tmp / "peft/adapter_config.json"))["peft_type"],
            "PREFIX_TUNING");
  for (const std::string sub : {"native", "peft"}) {
    ModuleSet other(load_model(dir));
    other.load(tmp / sub, "p");
    EXPECT_LE((other.model()->forward(in) - before).abs().max().item<double>(), 1e-6) << sub;
  }
  ModuleSet gpt(load_model(test::tiny_checkpoint("gpt2")));
  EXPECT_THROW_WITH(gpt.load(tmp / "peft"), "prompt_embeddings has shape", "another base model");
  EXPECT_THROW_WITH(set.fold("nope"), "no module named 'nope'");
}

}  // namespace
}  // namespace mdl

namespace mdl {
namespace {

// Input aggregation at the keys/values: two prefix modules together equal one prefix holding both sets
// of keys and values (real tokens shift by the total length; attention does not depend on key order).
TEST(PrefixTuning, SeveralPrefixesConcatenate) {
  ModuleSet set(load_model(test::tiny_checkpoint("llama")));
  ModuleSet one(load_model(test::tiny_checkpoint("llama")));
  auto encoder = [](ModuleSet& s, const std::string& name) {
    return std::dynamic_pointer_cast<PrefixTuningImpl>(s.module_at(name, s.sites(name).at(0)))->encoder();
  };
  for (auto [name, n] : {std::pair<const char*, int64_t>{"p1", 2}, {"p2", 3}}) {
    ModuleConfig c;
    c.type = "prefix";
    c.prefix.num_virtual_tokens = n;
    c.seed = static_cast<uint64_t>(n);
    set.add(name, c);
  }
  ModuleConfig both;
  both.type = "prefix";
  both.prefix.num_virtual_tokens = 5;
  one.add("p", both);
  {
    torch::NoGradGuard g;
    encoder(one, "p")->embedding.copy_(
        at::cat({encoder(set, "p2")->embedding, encoder(set, "p1")->embedding}, 0));
  }
  torch::NoGradGuard g;
  ModelInput in;
  in.input_ids = at::arange(20, 27, at::kLong).view({1, -1});
  at::Tensor got = set.model()->forward(in), want = one.model()->forward(in);
  EXPECT_LE((got - want).abs().max().item<double>(), 1e-5);
}

}  // namespace
}  // namespace mdl
