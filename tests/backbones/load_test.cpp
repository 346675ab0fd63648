// Loading Hugging Face checkpoints in their variants, saving them back, and the errors of a wrong base.
#include <ATen/ATen.h>
#include <torch/utils.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "backbones/fixtures.h"
#include "mdl/backbones/init_model.h"
#include "mdl/backbones/model.h"
#include "mdl/core/error.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/checkpoint.h"
#include "mdl/io/safetensors.h"

namespace fs = std::filesystem;

namespace mdl {
namespace {

at::Tensor logits_of(const std::string& dir, const LoadOptions& o = {}) {
  Model m = load_model(dir, o);
  torch::NoGradGuard g;
  ModelInput in;
  in.input_ids = at::arange(3, 12, at::kLong).view({1, -1}).to(m->device());
  return m->forward(in).to(at::kCPU, at::kFloat);
}

// A copy of `src` whose tensors and config.json are edited.
std::string variant(const test::TempDir& root, const std::string& name, const std::string& src,
                    const std::function<void(std::map<std::string, at::Tensor>&)>& edit_tensors,
                    const std::function<void(nlohmann::json&)>& edit_config = {}) {
  const std::string dir = root / name;
  fs::create_directories(dir);
  auto tensors = io::load_safetensors(src + "/model.safetensors");
  std::map<std::string, at::Tensor> owned;
  for (auto& [k, v] : tensors) owned[k] = v.clone();
  edit_tensors(owned);
  io::save_safetensors(dir + "/model.safetensors", owned);
  auto config = nlohmann::json::parse(io::read_text(src + "/config.json"));
  if (edit_config) edit_config(config);
  io::write_text_atomic(dir + "/config.json", config.dump());
  return dir;
}

TEST(Load, Gpt2WithoutPrefixAndWithAnUntiedHead) {
  const std::string src = test::tiny_checkpoint("gpt2");
  test::TempDir root;
  at::Tensor want = logits_of(src);
  // GPT2Model-style names ("h.0...", "wte.weight") load into the LM model too.
  std::string bare = variant(root, "bare", src, [](auto& t) {
    std::map<std::string, at::Tensor> out;
    for (auto& [k, v] : t) out[k.rfind("transformer.", 0) == 0 ? k.substr(12) : k] = v;
    t = out;
  });
  EXPECT_TRUE(at::equal(logits_of(bare), want));
  // A separate lm_head.weight is used when the config unties it.
  std::string untied = variant(
      root, "untied", src, [](auto& t) { t["lm_head.weight"] = t.at("transformer.wte.weight") * 2; },
      [](auto& c) { c["tie_word_embeddings"] = false; });
  EXPECT_TRUE(at::allclose(logits_of(untied), want * 2, 1e-5, 1e-5));
  // ...and ignored when tied (HF's behaviour).
  std::string tied_extra = variant(root, "tied-extra", src,
                                   [](auto& t) { t["lm_head.weight"] = t.at("transformer.wte.weight") * 2; });
  EXPECT_TRUE(at::equal(logits_of(tied_extra), want));
}

TEST(Load, ShardedSavedAndReloadedAreIdentical) {
  const std::string src = test::tiny_checkpoint("llama");
  test::TempDir root;
  Model m = load_model(src);
  save_model(*m, root / "sharded", /*max_shard_bytes=*/100000);
  EXPECT_TRUE(fs::exists(root / "sharded/model.safetensors.index.json"));
  EXPECT_GT(io::CheckpointReader(root / "sharded").files().size(), 1u);
  EXPECT_TRUE(at::equal(logits_of(root / "sharded"), logits_of(src)));
  // Saving writes the same tensors as the original (Conv1D transposed back for GPT-2 too).
  for (const std::string arch : {"gpt2", "bert"}) {
    const std::string dir = test::tiny_checkpoint(arch);
    save_model(*load_model(dir), root / ("resaved-" + arch));
    auto a = io::load_safetensors(dir + "/model.safetensors");
    auto b = io::load_safetensors(root / ("resaved-" + arch) + "/model.safetensors");
    ASSERT_EQ(a.size(), b.size()) << arch;
    for (auto& [k, v] : a) EXPECT_TRUE(at::equal(v, b.at(k))) << arch << " " << k;
  }
}

TEST(Load, Bf16AndDeviceOptions) {
  const std::string src = test::tiny_checkpoint("llama");
  LoadOptions o;
  o.dtype = at::kBFloat16;
  Model m = load_model(src, o);
  EXPECT_EQ(m->dtype(), at::kBFloat16);
  at::Tensor lo = logits_of(src, o), hi = logits_of(src);
  EXPECT_LT((lo - hi).abs().max().item<double>(), 0.1 * hi.abs().max().item<double>() + 0.05);
}

TEST(Load, WrongBaseModelsAreRefusedWithNamesAndShapes) {
  const std::string src = test::tiny_checkpoint("gpt2");
  test::TempDir root;
  std::string wrong = variant(root, "wrong-shape", src, [](auto& t) {
    t["transformer.h.1.mlp.c_fc.weight"] = at::zeros({64, 100});
  });
  EXPECT_THROW_WITH(load_model(wrong), "transformer.h.1.mlp.c_fc.weight", "[100, 64]", "[256, 64]",
                    "maybe the wrong base model");
  std::string missing = variant(root, "missing", src, [](auto& t) { t.erase("transformer.h.0.ln_2.bias"); });
  EXPECT_THROW_WITH(load_model(missing), "no tensor 'transformer.h.0.ln_2.bias'", "expected shape [64]");
  std::string ints =
      variant(root, "ints", src, [](auto& t) { t["transformer.ln_f.weight"] = at::ones({64}, at::kInt); });
  EXPECT_THROW_WITH(load_model(ints), "transformer.ln_f.weight", "floating point");
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), -std::numeric_limits<float>::infinity()}) {
    std::string nan = variant(root, "nan" + std::to_string(bad > 0), src,
                              [&](auto& t) { t["transformer.h.1.attn.c_attn.weight"].view(-1)[7] = bad; });
    EXPECT_THROW_WITH(load_model(nan), "transformer.h.1.attn.c_attn.weight",
                      "1 values that are NaN or infinite");
  }
  std::string arch = variant(
      root, "other-arch", src, [](auto&) {},
      [](auto& c) {
        c = {{"model_type", "llama"},    {"vocab_size", 384},      {"hidden_size", 64},
             {"intermediate_size", 128}, {"num_hidden_layers", 2}, {"num_attention_heads", 4}};
      });
  EXPECT_THROW_WITH(load_model(arch), "no tensor 'model.embed_tokens.weight'", "wrong base model");
}

TEST(Load, BertModelWithoutHeadSavesHuggingFaceNames) {
  const std::string dir = test::tiny_checkpoint("bert", "none");
  auto names = io::load_safetensors(dir + "/model.safetensors");
  EXPECT_TRUE(names.count("embeddings.word_embeddings.weight"));  // BertModel has no "bert." prefix
  EXPECT_TRUE(names.count("pooler.dense.weight"));
  Model m = load_model(dir);
  EXPECT_EQ(m->config().architecture, "BertModel");
  torch::NoGradGuard g;
  ModelInput in;
  in.input_ids = at::arange(5, 10, at::kLong).view({1, -1});
  EXPECT_EQ(m->forward(in).sizes(), (std::vector<int64_t>{1, 5, m->config().hidden_size}));
}

TEST(Load, AMissingHeadIsInitialisedNotInvented) {
  const std::string src = test::tiny_checkpoint("bert");
  test::TempDir root;
  std::string base = variant(root, "no-head", src, [](auto& t) {
    t.erase("classifier.weight");
    t.erase("classifier.bias");
  });
  Model m = load_model(base);
  torch::NoGradGuard g;
  ModelInput in;
  in.input_ids = at::arange(5, 10, at::kLong).view({1, -1});
  EXPECT_EQ(m->forward(in).sizes(), (std::vector<int64_t>{1, 2}));
  EXPECT_TRUE(at::equal(m->named_parameters()["classifier.bias"], at::zeros({2})));
  LoadOptions strict;
  strict.init_missing_head = false;
  EXPECT_THROW_WITH(load_model(base, strict), "no tensor 'classifier.weight'");
}

}  // namespace
}  // namespace mdl

namespace mdl {
namespace {

// The estimate load_model checks a config with before allocating equals what create_model allocates.
TEST(Load, EstimatedParametersAreWhatTheModelAllocates) {
  for (const std::string arch : {"gpt2", "llama", "mistral", "qwen2", "mixtral", "bert"})
    for (const std::string preset : {"tiny", "small"})
      for (const HeadKind head : {HeadKind::causal_lm, HeadKind::sequence_classification,
                                  HeadKind::token_classification, HeadKind::none}) {
        if (arch == "bert" && head == HeadKind::causal_lm) continue;
        ModelConfig c = preset_config(arch, preset, 512, head, 3);
        for (const bool tied : {false, true}) {
          c.tie_word_embeddings = tied && c.arch != Arch::bert;
          const double actual = static_cast<double>(create_model(c)->num_parameters());
          EXPECT_NEAR(static_cast<double>(estimated_parameters(c)) / actual, 1.0, 0.01)
              << arch << " " << preset << " " << head_name(head) << (tied ? " tied" : "");
        }
      }
  const nlohmann::json vit = {{"model_type", "vit"},    {"architectures", {"ViTForImageClassification"}},
                              {"hidden_size", 32},      {"intermediate_size", 64},
                              {"num_hidden_layers", 2}, {"num_attention_heads", 4},
                              {"image_size", 16},       {"patch_size", 4},
                              {"num_channels", 3},      {"num_labels", 10}};
  const ModelConfig c = parse_model_config(vit.dump(), "vit");
  EXPECT_NEAR(
      static_cast<double>(estimated_parameters(c)) / static_cast<double>(create_model(c)->num_parameters()),
      1.0, 0.01);
}

// The probe's allocations: num_hidden_layers 1e9 grew to 10 GB, vocab_size 5000000 took 2.6 GB before the
// mismatch was reported, n_head 0 divided by zero. Each is refused naming the field, before any weight
// is allocated.
TEST(Load, AConfigThatDoesNotFitIsRefusedBeforeAllocating) {
  const std::string src = test::tiny_checkpoint("llama");
  test::TempDir root;
  struct Case {
    std::string field;
    nlohmann::json value;
    std::vector<std::string> message;
  };
  const std::vector<Case> cases = {
      {"num_hidden_layers", 1000000000, {"'num_hidden_layers' is 1000000000", "expected 1..1024"}},
      {"num_hidden_layers", 3, {"'num_hidden_layers' is 3", "has 2 layers"}},
      {"vocab_size", 5000000, {"'vocab_size' is 5000000", "expected 1..4194304"}},
      {"vocab_size", 4000000, {"'vocab_size' 4000000", "token embedding of shape [4000000, 64]"}},
      {"hidden_size", 65536, {"'hidden_size' 65536", "token embedding"}},
      {"intermediate_size",
       200000,
       {"describes a model of about", "intermediate_size", "nothing was allocated"}},
      {"num_attention_heads", 0, {"'num_attention_heads' must be > 0"}},
      {"num_key_value_heads", 0, {"'num_key_value_heads' is 0"}},
      {"rope_theta", 0, {"'rope_theta' is 0", "expected a finite number in [1e-06"}},
      {"rms_norm_eps", -1e-5, {"'rms_norm_eps' is -1e-05"}},
      {"max_position_embeddings", -5, {"'max_position_embeddings' is -5"}},
  };
  const long before = test::peak_rss_kib();
  for (const auto& c : cases) {
    const std::string dir = variant(
        root, c.field + c.value.dump(), src, [](auto&) {}, [&](auto& j) { j[c.field] = c.value; });
    try {
      load_model(dir);
      ADD_FAILURE() << c.field << " = " << c.value << " loaded";
    } catch (const Error& e) {
      for (const auto& part : c.message)
        EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what() << "\n  lacks: " << part;
    }
  }
  EXPECT_LT(test::peak_rss_kib() - before, 200 * 1024) << "a refused config allocated its model first";
}

}  // namespace
}  // namespace mdl
