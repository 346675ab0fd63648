// Each architecture's logits against the independent implementation in reference.h (max abs diff <= 1e-4).
#include <ATen/ATen.h>
#include <torch/utils.h>

#include "backbones/fixtures.h"
#include "backbones/reference.h"
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

TEST(Reference, LeftPaddedBatchMatchesEachSequenceAlone) {
  const std::string dir = test::tiny_checkpoint("llama");
  Model m = load_model(dir);
  auto w = reference::load(dir, "model.");
  torch::NoGradGuard g;
  at::Tensor a = random_ids(5, m->config().vocab_size, 3), b = random_ids(8, m->config().vocab_size, 4);
  // Row 0: three pads then `a`; positions count real tokens only.
  at::Tensor ids = at::stack({at::cat({at::zeros({3}, at::kLong), a}), b});                         // (2, 8)
  at::Tensor mask = at::stack({at::cat({at::zeros({3}, at::kLong), at::ones({5}, at::kLong)}), at::ones({8}, at::kLong)});
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
  at::Tensor mask = at::stack({at::cat({at::ones({6}, at::kLong), at::zeros({3}, at::kLong)}), at::ones({9}, at::kLong)});
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
