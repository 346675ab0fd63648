// Decoding with a KV cache: greedy, temperature, top-k, top-p, seeded sampling, stop tokens, max tokens.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "mdl/backbones/model.h"

namespace mdl {

/// Sampling settings of one generation.
struct GenerateOptions {
  int64_t max_tokens = 32;   ///< new tokens at most
  double temperature = 0.0;  ///< 0 = greedy (argmax)
  int64_t top_k = 0;         ///< keep the k most likely tokens; 0 = all
  double top_p = 1.0;        ///< keep the smallest set whose probability reaches p; 1 = all
  uint64_t seed = 0;         ///< sampling seed: same seed, same tokens
  std::vector<int64_t>
      stop_token_ids;  ///< generation ends after emitting one of these (default: the config's EOS)
  /// no stop token at all: only max_tokens or the context end it (vLLM's ignore_eos)
  bool ignore_eos = false;
  bool use_cache = true;  ///< false recomputes the whole sequence each step (reference path)
  /// OpenAI's penalties, over the tokens generated so far: a token's logit is lowered by
  /// frequency_penalty x its count plus presence_penalty once it has appeared; each in [-2, 2]
  double frequency_penalty = 0.0, presence_penalty = 0.0;
  /// report each chosen token's log-probability and the `logprobs` most likely ones (0 to 20); -1: none.
  /// Log-probabilities are the model's (log-softmax of its logits, before penalties and temperature).
  int64_t logprobs = -1;
};

/// A chosen token's log-probability and the most likely alternatives at its step (most likely first).
struct TokenLogprob {
  int64_t token = -1;
  double logprob = 0;
  std::vector<std::pair<int64_t, double>> top;
};

/// What a generation produced.
struct GenerateResult {
  std::vector<int64_t> tokens;  ///< new tokens (a stop token included)
  std::string finish_reason;    ///< "stop", "length" (max tokens or context) or "callback"
  double prefill_seconds = 0;
  double decode_seconds = 0;
};

/// Picks the next token from logits (V), deterministic for a seed.
class Sampler {
 public:
  explicit Sampler(const GenerateOptions& options);
  /// logits (V) on any device -> token id; throws on invalid options. The token counts toward the
  /// penalties of later steps.
  int64_t sample(const at::Tensor& logits);
  /// With options.logprobs >= 0: the last sampled token's log-probability and its step's top tokens.
  const TokenLogprob& last() const { return last_; }

 private:
  GenerateOptions options_;
  std::mt19937_64 rng_;
  /// The token from (penalised) logits (V, CPU double): greedy, or temperature / top-k / top-p sampling.
  int64_t pick(const at::Tensor& logits);
  std::map<int64_t, int64_t> counts_;  // generated token -> times (for the penalties)
  TokenLogprob last_;
};

/// Checks sampling options; throws naming the bad field.
void validate(const GenerateOptions& options);

/// Generates after `prompt` with a causal-LM model. `on_token` (optional) sees each new token and may
/// return false to stop.
GenerateResult generate(ModelImpl& model, const std::vector<int64_t>& prompt, const GenerateOptions& options,
                        const std::function<bool(int64_t)>& on_token = {});

}  // namespace mdl
