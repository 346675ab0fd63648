// Each architecture's logits against the independent implementation in reference.h (max abs diff <= 1e-4).
#include "backbones/reference.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include "backbones/fixtures.h"
#include "mdl/backbones/model.h"

namespace mdl {
namespace {

at::Tensor random_ids(int64_t n, int64_t vocab, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  return at::randint(3, vocab, {n}, gen, at::kLong);
}

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

TEST(Reference, Gpt2LogitsMatch) {
  const std::string dir = test::tiny_checkpoint("gpt2");
  Model m = load_model(dir);
  auto w = reference::load(dir, "transformer.");
  torch::NoGradGuard g;
  at::Tensor ids = random_ids(17, m->config().vocab_size, 1);
  ModelInput in;
  in.input_ids = ids.view({1, -1});
  at::Tensor got = m->forward(in)[0];
  at::Tensor want = reference::gpt2(w, m->config(), ids);
  EXPECT_EQ(got.sizes(), want.sizes());
  const double d = max_diff(got, want);
  std::printf("[gpt2] max |logits - reference| = %.3g\n", d);
  EXPECT_LE(d, 1e-4);
}

class LlamaFamily : public ::testing::TestWithParam<std::string> {};

TEST_P(LlamaFamily, LogitsMatch) {
  const std::string dir = test::tiny_checkpoint(GetParam());
  Model m = load_model(dir);
  auto w = reference::load(dir, "model.");
  const ModelConfig& c = m->config();
  if (GetParam() == "qwen2") {
    EXPECT_TRUE(c.qkv_bias && c.tie_word_embeddings);
  }
  if (GetParam() == "llama") {
    EXPECT_LT(c.n_kv_head, c.n_head);  // grouped-query attention
  }
  // Mistral: longer than its window, so the window matters.
  const int64_t T = GetParam() == "mistral" ? c.sliding_window + 16 : 13;
  torch::NoGradGuard g;
  at::Tensor ids = random_ids(T, c.vocab_size, 2);
  ModelInput in;
  in.input_ids = ids.view({1, -1});
  at::Tensor got = m->forward(in)[0];
  at::Tensor want = reference::llama(w, c, ids);
  const double d = max_diff(got, want);
  std::printf("[%s] max |logits - reference| = %.3g over %lld tokens\n", GetParam().c_str(), d, (long long)T);
  EXPECT_LE(d, 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Archs, LlamaFamily, ::testing::Values("llama", "mistral", "qwen2", "mixtral"));

// Every weight's gradient through mdl's training nodes (projections that keep what rebuilds their input,
// attention that computes its probabilities again in backward, the fused norms, rotary embeddings and
// SwiGLU) against autograd through the reference's plain float64 ops.
void expect_gradients_match(const std::string& arch, const std::string& prefix) {
  const std::string dir = test::tiny_checkpoint(arch);
  Model m = load_model(dir);
  const ModelConfig& c = m->config();
  auto w = reference::load(dir, prefix);
  for (auto& entry : w.t) entry.second = entry.second.detach().clone().requires_grad_(true);
  at::Tensor ids = random_ids(arch == "mistral" ? c.sliding_window + 5 : 13, c.vocab_size, 8);
  ModelInput in;
  in.input_ids = ids.view({1, -1});
  at::Tensor got = m->forward(in)[0];  // (T, V)
  at::Tensor r = at::randn(got.sizes(), at::detail::createCPUGenerator(9), at::kDouble);
  (got.to(at::kDouble) * r).sum().backward();
  at::Tensor want = arch == "gpt2" ? reference::gpt2(w, c, ids) : reference::llama(w, c, ids);
  (want * r).sum().backward();
  int compared = 0;
  for (const auto& p : m->named_parameters()) {
    auto it = w.t.find(p.key());
    ASSERT_TRUE(it != w.t.end()) << arch << ": " << p.key() << " is not in the checkpoint";
    ASSERT_TRUE(p.value().grad().defined() && it->second.grad().defined()) << arch << ": " << p.key();
    at::Tensor g = p.value().grad().to(at::kDouble), ref = it->second.grad().to(at::kDouble);
    const bool conv1d = arch == "gpt2" && ref.dim() == 2 && p.key().find(".h.") != std::string::npos;
    if (conv1d) ref = ref.t();  // GPT-2's Conv1D weights are stored (in, out)
    const double scale = std::max(1e-6, ref.abs().max().item<double>());
    EXPECT_LE(max_diff(g, ref) / scale, 1e-4) << arch << ": " << p.key();
    ++compared;
  }
  EXPECT_GE(compared, 2 + 9 * c.n_layer) << arch;
}

TEST(Reference, GradientsMatch) {
  for (const auto& [arch, prefix] : std::vector<std::pair<std::string, std::string>>{
           {"llama", "model."}, {"mistral", "model."}, {"qwen2", "model."}, {"gpt2", "transformer."}})
    expect_gradients_match(arch, prefix);
}

TEST(Reference, LeftPaddedBatchMatchesEachSequenceAlone) {
  const std::string dir = test::tiny_checkpoint("llama");
  Model m = load_model(dir);
  auto w = reference::load(dir, "model.");
  torch::NoGradGuard g;
  at::Tensor a = random_ids(5, m->config().vocab_size, 3), b = random_ids(8, m->config().vocab_size, 4);
  // Row 0: three pads then `a`; positions count real tokens only.
  at::Tensor ids = at::stack({at::cat({at::zeros({3}, at::kLong), a}), b});  // (2, 8)
  at::Tensor mask =
      at::stack({at::cat({at::zeros({3}, at::kLong), at::ones({5}, at::kLong)}), at::ones({8}, at::kLong)});
  ModelInput in;
  in.input_ids = ids;
  in.attention_mask = mask;
  in.position_ids = (mask.cumsum(1) - 1).clamp_min(0);
  at::Tensor got = m->forward(in);  // (2, 8, V)
  EXPECT_FALSE(got.isnan().any().item<bool>());
  EXPECT_LE(max_diff(got[0].narrow(0, 3, 5), reference::llama(w, m->config(), a)), 1e-4);
  EXPECT_LE(max_diff(got[1], reference::llama(w, m->config(), b)), 1e-4);
}

TEST(Reference, BertClassifierWithPaddingMask) {
  const std::string dir = test::tiny_checkpoint("bert");
  Model m = load_model(dir);
  auto w = reference::load(dir, "bert.");
  const ModelConfig& c = m->config();
  ASSERT_EQ(c.head, HeadKind::sequence_classification);
  torch::NoGradGuard g;
  at::Tensor a = random_ids(6, c.vocab_size, 5), b = random_ids(9, c.vocab_size, 6);
  at::Tensor ids = at::stack({at::cat({a, at::zeros({3}, at::kLong)}), b});  // right padding
  at::Tensor mask =
      at::stack({at::cat({at::ones({6}, at::kLong), at::zeros({3}, at::kLong)}), at::ones({9}, at::kLong)});
  ModelInput in;
  in.input_ids = ids;
  in.attention_mask = mask;
  at::Tensor got = m->forward(in);  // (2, L)
  ASSERT_EQ(got.sizes(), (std::vector<int64_t>{2, c.num_labels}));
  const double d = std::max(max_diff(got[0], reference::bert_classify(w, c, a)),
                            max_diff(got[1], reference::bert_classify(w, c, b)));
  std::printf("[bert] max |logits - reference| = %.3g\n", d);
  EXPECT_LE(d, 1e-4);
}

TEST(Reference, DecoderClassificationHeadsReadTheLastRealToken) {
  const std::string dir = test::tiny_checkpoint("llama", "sequence_classification");
  Model m = load_model(dir);
  auto w = reference::load(dir, "model.");
  torch::NoGradGuard g;
  at::Tensor a = random_ids(4, m->config().vocab_size, 7);
  at::Tensor ids = at::cat({a, at::zeros({2}, at::kLong)}).view({1, -1});
  ModelInput in;
  in.input_ids = ids;
  in.attention_mask = at::cat({at::ones({4}, at::kLong), at::zeros({2}, at::kLong)}).view({1, -1});
  at::Tensor got = m->forward(in)[0];  // (L)
  at::Tensor hidden = reference::llama_hidden(w, m->config(), a);
  at::Tensor want = hidden[3].matmul(w.t.at("score.weight").to(at::kDouble).t());
  EXPECT_LE(max_diff(got, want), 1e-4);

  const std::string tok_dir = test::tiny_checkpoint("gpt2", "token_classification");
  Model t = load_model(tok_dir);
  ModelInput tin;
  tin.input_ids = a.view({1, -1});
  EXPECT_EQ(t->forward(tin).sizes(), (std::vector<int64_t>{1, 4, 2}));
}

}  // namespace
}  // namespace mdl
