// ViT: the Hugging Face layout on disk, logits against an independent float64 implementation written
// from the equations (patch convolution as explicit patch products, pre-LayerNorm blocks, [CLS] head),
// modules on its sites, upcycling to experts, and the errors for wrong inputs.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include "backbones/reference.h"
#include "mdl/backbones/model.h"
#include "mdl/backbones/moe_convert.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/safetensors.h"
#include "mdl/modules/module_set.h"
#include "test_util.h"

namespace mdl {
namespace {

ModelConfig tiny_vit() {
  nlohmann::json j = {{"model_type", "vit"},      {"architectures", {"ViTForImageClassification"}},
                      {"hidden_size", 32},        {"num_hidden_layers", 2},
                      {"num_attention_heads", 4}, {"intermediate_size", 64},
                      {"image_size", 8},          {"patch_size", 4},
                      {"num_channels", 3},        {"num_labels", 5},
                      {"layer_norm_eps", 1e-12},  {"hidden_act", "gelu"}};
  return parse_model_config(j.dump(), "tiny vit");
}

std::string saved_vit(const test::TempDir& tmp) {
  Model m = create_model(tiny_vit());
  m->init_weights(3);
  {  // non-trivial norms and biases, so the reference checks them too
    torch::NoGradGuard no_grad;
    for (auto& p : m->named_parameters()) p.value().add_(at::randn(p.value().sizes()) * 0.05);
  }
  save_model(*m, tmp / "vit");
  return tmp / "vit";
}

/// Logits (L) of one image (C, S, S) computed from the checkpoint's tensors by name, in float64.
at::Tensor reference_logits(const reference::Weights& w, const ModelConfig& c, const at::Tensor& image) {
  const int64_t P = c.patch_size, n = c.image_size / P, C = c.hidden_size, H = c.n_head, D = C / H;
  at::Tensor x = image.to(at::kDouble);
  at::Tensor proj = w("vit.embeddings.patch_embeddings.projection.weight").reshape({C, -1});  // (C, ch*P*P)
  std::vector<at::Tensor> tokens = {w("vit.embeddings.cls_token").reshape({C})};
  for (int64_t i = 0; i < n; ++i)  // patches in row-major order
    for (int64_t j = 0; j < n; ++j) {
      at::Tensor patch = x.narrow(1, i * P, P).narrow(2, j * P, P).reshape({-1});
      tokens.push_back(at::mv(proj, patch) + w("vit.embeddings.patch_embeddings.projection.bias"));
    }
  at::Tensor h = at::stack(tokens) + w("vit.embeddings.position_embeddings").reshape({n * n + 1, C});
  auto linear = [&](const at::Tensor& v, const std::string& name) {
    return at::matmul(v, w(name + ".weight").t()) + w(name + ".bias");
  };
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const std::string p = "vit.encoder.layer." + std::to_string(l);
    at::Tensor a = reference::layer_norm(h, w(p + ".layernorm_before.weight"),
                                         w(p + ".layernorm_before.bias"), c.norm_eps);
    at::Tensor q = linear(a, p + ".attention.attention.query"), k = linear(a, p + ".attention.attention.key"),
               v = linear(a, p + ".attention.attention.value");
    std::vector<at::Tensor> heads;
    for (int64_t hd = 0; hd < H; ++hd) {
      at::Tensor qh = q.narrow(1, hd * D, D), kh = k.narrow(1, hd * D, D), vh = v.narrow(1, hd * D, D);
      heads.push_back(at::matmul(reference::softmax_rows(at::matmul(qh, kh.t()) / std::sqrt(double(D))), vh));
    }
    h = h + linear(at::cat(heads, 1), p + ".attention.output.dense");
    at::Tensor m = reference::layer_norm(h, w(p + ".layernorm_after.weight"), w(p + ".layernorm_after.bias"),
                                         c.norm_eps);
    h = h + linear(reference::gelu_erf(linear(m, p + ".intermediate.dense")), p + ".output.dense");
  }
  h = reference::layer_norm(h, w("vit.layernorm.weight"), w("vit.layernorm.bias"), c.norm_eps);
  return at::mv(w("classifier.weight"), h[0]) + w("classifier.bias");
}

at::Tensor logits(ModelImpl& m, const at::Tensor& pixels) {
  torch::NoGradGuard no_grad;
  ModelInput in;
  in.pixel_values = pixels;
  return m.forward(in);
}

TEST(ViT, HuggingFaceLayoutAndConfig) {
  test::TempDir tmp;
  const std::string dir = saved_vit(tmp);
  auto tensors = io::load_safetensors(dir + "/model.safetensors");
  for (const char* name :
       {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
        "vit.embeddings.patch_embeddings.projection.weight",
        "vit.encoder.layer.1.attention.attention.query.bias",
        "vit.encoder.layer.0.attention.output.dense.weight", "vit.encoder.layer.0.intermediate.dense.weight",
        "vit.encoder.layer.0.output.dense.bias", "vit.encoder.layer.1.layernorm_before.weight",
        "vit.encoder.layer.1.layernorm_after.bias", "vit.layernorm.weight", "classifier.weight"})
    EXPECT_TRUE(tensors.count(name)) << name;
  EXPECT_EQ(tensors.at("vit.embeddings.patch_embeddings.projection.weight").sizes(),
            (at::IntArrayRef{32, 3, 4, 4}));
  EXPECT_EQ(tensors.at("vit.embeddings.position_embeddings").sizes(), (at::IntArrayRef{1, 5, 32}));
  EXPECT_EQ(tensors.size(), 4u + 2 * 16u + 2 + 2);  // embeddings, 16 per block, final norm, classifier
  auto j = nlohmann::json::parse(io::read_text(dir + "/config.json"));
  EXPECT_EQ(j["model_type"], "vit");
  EXPECT_EQ(j["architectures"][0], "ViTForImageClassification");
  EXPECT_EQ(j["image_size"], 8);
  EXPECT_EQ(j["patch_size"], 4);
  EXPECT_EQ(j["num_channels"], 3);
  EXPECT_FALSE(j.contains("vocab_size"));
}

TEST(ViT, LogitsMatchTheReference) {
  test::TempDir tmp;
  const std::string dir = saved_vit(tmp);
  Model m = load_model(dir);
  const ModelConfig& c = m->config();
  at::Tensor pixels = at::rand({3, 3, 8, 8});
  at::Tensor got = logits(*m, pixels);
  ASSERT_EQ(got.sizes(), (at::IntArrayRef{3, 5}));
  auto w = reference::load(dir, "");
  double worst = 0;
  for (int64_t b = 0; b < 3; ++b)
    worst = std::max(worst,
                     (got[b].to(at::kDouble) - reference_logits(w, c, pixels[b])).abs().max().item<double>());
  std::printf("[vit] max |logits - reference| = %.3g\n", worst);
  EXPECT_LT(worst, 1e-5);
}

TEST(ViT, ModulesAttachAtItsSites) {
  test::TempDir tmp;
  Model m = load_model(saved_vit(tmp));
  at::Tensor pixels = at::rand({2, 3, 8, 8});
  at::Tensor base = logits(*m, pixels);
  ModuleSet set(m);
  ModuleConfig lora;  // PEFT's default targets for ViT: query and value
  set.add("lora", lora);
  EXPECT_EQ(set.sites("lora"), (std::vector<std::string>{"vit.encoder.layer.0.attention.attention.query",
                                                         "vit.encoder.layer.0.attention.attention.value",
                                                         "vit.encoder.layer.1.attention.attention.query",
                                                         "vit.encoder.layer.1.attention.attention.value"}));
  EXPECT_CLOSE(logits(*m, pixels), base, 1e-6);  // B starts at zero
  ModuleConfig adapter;
  adapter.type = "adapter";
  set.add("adapter", adapter);
  EXPECT_EQ(set.sites("adapter"),
            (std::vector<std::string>{"vit.encoder.layer.0.output", "vit.encoder.layer.1.output"}));
  ModuleConfig head;  // the classifier is a site too: a linear probe as a module
  head.targets.target_modules = {"classifier"};
  set.add("head", head);
  EXPECT_EQ(set.sites("head"), (std::vector<std::string>{"classifier"}));
}

TEST(ViT, UpcycledEqualsDenseAndRoundTrips) {
  test::TempDir tmp;
  Model dense = load_model(saved_vit(tmp));
  UpcycleOptions o;
  o.experts = 4;
  o.top_k = 2;
  Model moe = upcycle(*dense, o);
  EXPECT_EQ(moe->config().num_experts, 4);
  at::Tensor pixels = at::rand({2, 3, 8, 8});
  EXPECT_LT((logits(*moe, pixels) - logits(*dense, pixels)).abs().max().item<double>(), 1e-5);
  save_model(*moe, tmp / "moe");
  auto j = nlohmann::json::parse(io::read_text(tmp / "moe/config.json"));
  EXPECT_EQ(j["num_local_experts"], 4);
  Model back = load_model(tmp / "moe");
  EXPECT_TRUE(at::equal(logits(*back, pixels), logits(*moe, pixels)));
  EXPECT_THROW_WITH(upcycle(*moe, o), "already has experts");
}

// Gradient checkpointing reruns the ViT blocks in backward: the same gradients as keeping them.
TEST(ViT, GradientCheckpointingGivesTheSameGradients) {
  Model m = create_model(tiny_vit());
  m->init_weights(5);
  m->train();
  ModelInput in;
  in.pixel_values = at::randn({3, 3, 8, 8});
  std::vector<at::Tensor> grads[2];
  for (bool checkpointing : {false, true}) {
    m->set_gradient_checkpointing(checkpointing);
    m->forward(in).pow(2).sum().backward();
    for (auto& p : m->parameters()) {
      grads[checkpointing].push_back(p.grad().clone());
      p.mutable_grad() = at::Tensor();
    }
  }
  for (size_t i = 0; i < grads[0].size(); ++i)
    EXPECT_TRUE(at::allclose(grads[0][i], grads[1][i], 1e-5, 1e-6)) << i;
}

TEST(ViT, WrongInputsAreClearErrors) {
  test::TempDir tmp;
  Model m = load_model(saved_vit(tmp));
  ModelInput in;
  in.input_ids = at::zeros({1, 4}, at::kLong);
  EXPECT_THROW_WITH(m->forward(in), "[vit] a Vision Transformer reads images", "pixel_values (B, 3, 8, 8)");
  in.pixel_values = at::rand({1, 1, 8, 8});
  EXPECT_THROW_WITH(m->forward(in), "pixel_values must be (B, 3, 8, 8), got [1, 1, 8, 8]");
  nlohmann::json bad = {{"model_type", "vit"},      {"hidden_size", 32},       {"num_hidden_layers", 1},
                        {"num_attention_heads", 4}, {"intermediate_size", 64}, {"image_size", 10},
                        {"patch_size", 4}};
  EXPECT_THROW_WITH(parse_model_config(bad.dump(), "bad.json"),
                    "'bad.json': image_size 10 must be a multiple of patch_size 4");
}

}  // namespace
}  // namespace mdl
