// Decoding with a KV cache: greedy, temperature, top-k, top-p, seeded sampling, stop tokens, max tokens.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
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
  /// logits (V) on any device -> token id; throws on invalid options.
  int64_t sample(const at::Tensor& logits);

 private:
  GenerateOptions options_;
  std::mt19937_64 rng_;
};

/// Checks sampling options; throws naming the bad field.
void validate(const GenerateOptions& options);

/// Generates after `prompt` with a causal-LM model. `on_token` (optional) sees each new token and may
/// return false to stop.
GenerateResult generate(ModelImpl& model, const std::vector<int64_t>& prompt, const GenerateOptions& options,
                        const std::function<bool(int64_t)>& on_token = {});

}  // namespace mdl
