#include "mdl/backbones/generate.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include "backbones/fixtures.h"

namespace mdl {
namespace {

class Decoders : public ::testing::TestWithParam<std::string> {};

TEST_P(Decoders, CachedDecodingEqualsRecomputation) {
  Model m = load_model(test::tiny_checkpoint(GetParam()));
  torch::NoGradGuard g;
  const int64_t T = GetParam() == "mistral" ? m->config().sliding_window + 10 : 24;
  auto gen = at::detail::createCPUGenerator(9);
  at::Tensor ids = at::randint(3, m->config().vocab_size, {2, T}, gen, at::kLong);  // (B, T)
  ModelInput full;
  full.input_ids = ids;
  at::Tensor want = m->forward(full);  // (B, T, V)

  KVCache cache;
  ModelInput step;
  step.cache = &cache;
  const int64_t prefill = 5;
  step.input_ids = ids.narrow(1, 0, prefill);
  std::vector<at::Tensor> pieces = {m->forward(step)};
  for (int64_t t = prefill; t < T; ++t) {
    step.input_ids = ids.narrow(1, t, 1);
    pieces.push_back(m->forward(step));
  }
  EXPECT_EQ(cache.length(), T);
  const double d = (at::cat(pieces, 1) - want).abs().max().item<double>();
  std::printf("[%s] max |cached - recomputed| = %.3g\n", GetParam().c_str(), d);
  EXPECT_LE(d, 1e-5);
}

TEST_P(Decoders, GreedyGenerationWithAndWithoutCacheAgree) {
  Model m = load_model(test::tiny_checkpoint(GetParam()));
  GenerateOptions o;
  o.max_tokens = 12;
  o.stop_token_ids = {-1};  // never stop early
  GenerateResult cached = generate(*m, {5, 6, 7}, o);
  o.use_cache = false;
  GenerateResult plain = generate(*m, {5, 6, 7}, o);
  EXPECT_EQ(cached.tokens, plain.tokens);
  EXPECT_EQ(cached.tokens.size(), 12u);
  EXPECT_EQ(cached.finish_reason, "length");
}

INSTANTIATE_TEST_SUITE_P(Archs, Decoders, ::testing::Values("gpt2", "llama", "mistral", "mixtral"));

TEST(Generate, SeedsTopKAndStops) {
  Model m = load_model(test::tiny_checkpoint("gpt2"));
  GenerateOptions o;
  o.max_tokens = 16;
  o.stop_token_ids = {-1};
  o.temperature = 1.5;
  o.seed = 1;
  auto a = generate(*m, {10, 11}, o), b = generate(*m, {10, 11}, o);
  EXPECT_EQ(a.tokens, b.tokens);
  o.seed = 2;
  EXPECT_NE(generate(*m, {10, 11}, o).tokens, a.tokens);
  o.top_k = 1;
  GenerateOptions greedy;
  greedy.max_tokens = 16;
  greedy.stop_token_ids = {-1};
  const auto greedy_tokens = generate(*m, {10, 11}, greedy).tokens;
  EXPECT_EQ(generate(*m, {10, 11}, o).tokens, greedy_tokens);
  greedy.stop_token_ids = {greedy_tokens[2]};
  auto stopped = generate(*m, {10, 11}, greedy);
  EXPECT_EQ(stopped.finish_reason, "stop");
  EXPECT_LE(stopped.tokens.size(), 3u);
  EXPECT_EQ(stopped.tokens.back(), greedy_tokens[2]);
  int seen = 0;
  auto cb = generate(*m, {10, 11}, o, [&](int64_t) { return ++seen < 4; });
  EXPECT_EQ(cb.finish_reason, "callback");
  EXPECT_EQ(cb.tokens.size(), 4u);
}

TEST(Sampler, FollowsTheDistributionAndItsCuts) {
  at::Tensor logits = at::tensor({0.0, 1.0, 2.0, 3.0});
  GenerateOptions o;
  EXPECT_EQ(Sampler(o).sample(logits), 3);  // greedy
  o.temperature = 1.0;
  o.seed = 5;
  Sampler s(o);
  std::vector<int> counts(4);
  const int n = 20000;
  for (int i = 0; i < n; ++i) counts[s.sample(logits)]++;
  at::Tensor p = at::softmax(logits, 0);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(counts[i] / double(n), p[i].item<double>(), 0.015) << i;
  o.top_k = 2;
  Sampler k2(o);
  for (int i = 0; i < 200; ++i) EXPECT_GE(k2.sample(logits), 2);
  o.top_k = 0;
  o.top_p = 0.5;  // the top token alone has p = 0.64
  Sampler p5(o);
  for (int i = 0; i < 200; ++i) EXPECT_EQ(p5.sample(logits), 3);
}

// OpenAI's penalties: a token's logit is lowered by frequency x count + presence once it has appeared.
TEST(Sampler, PenaltiesLowerWhatWasGeneratedAndLogprobsAreTheModels) {
  const at::Tensor logits = at::tensor({0.0, 2.0, 3.0});  // greedy: token 2, then 1 once penalised enough
  GenerateOptions o;
  o.frequency_penalty = 0.6;  // after k times token 2 sits at 3 - 0.6 k: below 2 from the second repeat
  Sampler f(o);
  std::vector<int64_t> got;
  for (int i = 0; i < 5; ++i) got.push_back(f.sample(logits));
  // 3 | 2.4 | 1.8 < 2 -> 1 (now 2 - 0.6 = 1.4 < 1.8) -> 2 (1.2) | 1.4 > 1.2 -> 1
  EXPECT_EQ(got, (std::vector<int64_t>{2, 2, 1, 2, 1}));
  o = {};
  o.presence_penalty = 1.5;  // once seen, a token loses 1.5 however often: 3 -> 1.5 < 2; then 2 -> 0.5 < 1.5
  Sampler p(o);
  got.clear();
  for (int i = 0; i < 3; ++i) got.push_back(p.sample(logits));
  EXPECT_EQ(got, (std::vector<int64_t>{2, 1, 2}));
  EXPECT_EQ(logits[2].item<double>(), 3.0) << "the caller's logits are not penalised in place";
  // Log-probabilities: the model's (log-softmax of the logits), not the penalised or tempered ones.
  o = {};
  o.logprobs = 2;
  o.presence_penalty = 2;
  o.temperature = 0.5;
  o.seed = 3;
  Sampler lp(o);
  const at::Tensor want = at::log_softmax(logits.to(at::kDouble), 0);
  for (int i = 0; i < 3; ++i) {
    const int64_t t = lp.sample(logits);
    EXPECT_EQ(lp.last().token, t);
    EXPECT_NEAR(lp.last().logprob, want[t].item<double>(), 1e-12);
    ASSERT_EQ(lp.last().top.size(), 2u);
    EXPECT_EQ(lp.last().top[0].first, 2);
    EXPECT_NEAR(lp.last().top[0].second, want[2].item<double>(), 1e-12);
    EXPECT_EQ(lp.last().top[1].first, 1);
  }
  o = {};
  o.frequency_penalty = 2.5;
  EXPECT_THROW_WITH(validate(o), "must be in [-2, 2]");
  o = {};
  o.logprobs = 21;
  EXPECT_THROW_WITH(validate(o), "logprobs must be 0 to 20");
}

TEST(Generate, BadOptionsAndModelsAreRefused) {
  GenerateOptions o;
  o.temperature = -1;
  EXPECT_THROW_WITH(validate(o), "temperature must be >= 0");
  o = {};
  o.top_p = 0;
  EXPECT_THROW_WITH(validate(o), "top_p must be in (0, 1]");
  o = {};
  o.top_k = -2;
  EXPECT_THROW_WITH(validate(o), "top_k must be >= 0");
  Model bert = load_model(test::tiny_checkpoint("bert"));
  EXPECT_THROW_WITH(generate(*bert, {1, 2}, {}), "no causal LM head");
  Model gpt = load_model(test::tiny_checkpoint("gpt2"));
  EXPECT_THROW_WITH(generate(*gpt, {}, {}), "prompt is empty");
  EXPECT_THROW_WITH(generate(*gpt, std::vector<int64_t>(300, 5), {}), "does not fit the context");
}

}  // namespace
}  // namespace mdl
