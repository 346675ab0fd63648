#include "mdl/backbones/generate.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "mdl/core/error.h"

namespace mdl {

void validate(const GenerateOptions& o) {
  MDL_CHECK(o.max_tokens >= 0, "[generate] max_tokens must be >= 0, got ", o.max_tokens);
  MDL_CHECK(o.temperature >= 0 && std::isfinite(o.temperature), "[generate] temperature must be >= 0, got ",
            o.temperature);
  MDL_CHECK(o.top_k >= 0, "[generate] top_k must be >= 0 (0 = no limit), got ", o.top_k);
  MDL_CHECK(o.top_p > 0 && o.top_p <= 1, "[generate] top_p must be in (0, 1], got ", o.top_p);
  MDL_CHECK(std::abs(o.frequency_penalty) <= 2 && std::abs(o.presence_penalty) <= 2,
            "[generate] frequency_penalty and presence_penalty must be in [-2, 2], got ", o.frequency_penalty,
            " and ", o.presence_penalty);
  MDL_CHECK(o.logprobs >= -1 && o.logprobs <= 20, "[generate] logprobs must be 0 to 20 (or -1: none), got ",
            o.logprobs);
}

Sampler::Sampler(const GenerateOptions& options) : options_(options), rng_(options.seed) {
  validate(options);
}

int64_t Sampler::sample(const at::Tensor& logits) {
  at::Tensor l = logits.detach().to(at::kCPU, at::kDouble).contiguous();  // (V)
  const int64_t V = l.numel();
  at::Tensor model_logprobs;
  if (options_.logprobs >= 0) model_logprobs = at::log_softmax(l, 0);
  if (options_.frequency_penalty != 0 || options_.presence_penalty != 0) {
    if (l.data_ptr() == logits.data_ptr()) l = l.clone();  // `to` returned the caller's tensor: not in place
    double* w = l.data_ptr<double>();
    for (const auto& [token, n] : counts_)
      if (token >= 0 && token < V)
        w[token] -= options_.frequency_penalty * static_cast<double>(n) + options_.presence_penalty;
  }
  const int64_t token = pick(l);
  ++counts_[token];
  if (model_logprobs.defined()) {
    const double* lp = model_logprobs.data_ptr<double>();
    last_.token = token;
    last_.logprob = lp[token];
    last_.top.clear();
    const int64_t k = std::min(options_.logprobs, V);
    std::vector<int64_t> order(static_cast<size_t>(V));
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int64_t a, int64_t b) { return lp[a] != lp[b] ? lp[a] > lp[b] : a < b; });
    for (int64_t i = 0; i < k; ++i)
      last_.top.emplace_back(order[static_cast<size_t>(i)], lp[order[static_cast<size_t>(i)]]);
  }
  return token;
}

int64_t Sampler::pick(const at::Tensor& l) {
  const double* data = l.data_ptr<double>();
  const int64_t V = l.numel();
  if (options_.temperature == 0.0) return std::max_element(data, data + V) - data;
  std::vector<int64_t> order(V);
  std::iota(order.begin(), order.end(), 0);
  int64_t keep = options_.top_k > 0 ? std::min(options_.top_k, V) : V;
  // Most likely first; ties by lower id, so the result does not depend on the sort's stability.
  auto better = [&](int64_t a, int64_t b) { return data[a] != data[b] ? data[a] > data[b] : a < b; };
  std::partial_sort(order.begin(), order.begin() + keep, order.end(), better);
  order.resize(keep);
  const double max_logit = data[order[0]];
  std::vector<double> probs(keep);
  double total = 0;
  for (int64_t i = 0; i < keep; ++i)
    total += probs[i] = std::exp((data[order[i]] - max_logit) / options_.temperature);
  if (options_.top_p < 1.0) {
    double cumulative = 0;
    int64_t n = 0;
    while (n < keep) {
      cumulative += probs[n++] / total;
      if (cumulative >= options_.top_p) break;
    }
    order.resize(n), probs.resize(n);
    total = std::accumulate(probs.begin(), probs.end(), 0.0);
  }
  const double u = static_cast<double>(rng_() >> 11) * 0x1.0p-53 * total;
  double acc = 0;
  for (size_t i = 0; i < probs.size(); ++i) {
    acc += probs[i];
    if (u < acc) return order[i];
  }
  return order.back();
}

GenerateResult generate(ModelImpl& model, const std::vector<int64_t>& prompt, const GenerateOptions& options,
                        const std::function<bool(int64_t)>& on_token) {
  const ModelConfig& config = model.config();
  MDL_CHECK(config.head == HeadKind::causal_lm, "[generate] ", config.architecture,
            " has no causal LM head; generation needs a *ForCausalLM / *LMHeadModel checkpoint");
  MDL_CHECK(!prompt.empty(), "[generate] the prompt is empty; give at least one token (e.g. BOS)");
  MDL_CHECK(static_cast<int64_t>(prompt.size()) < config.max_position, "[generate] prompt of ", prompt.size(),
            " tokens does not fit the context of ", config.max_position, " positions");
  Sampler sampler(options);
  const std::vector<int64_t> stops = options.ignore_eos               ? std::vector<int64_t>{}
                                     : options.stop_token_ids.empty() ? config.eos_token_ids
                                                                      : options.stop_token_ids;
  torch::NoGradGuard no_grad;
  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(model.device());
  using clock = std::chrono::steady_clock;

  GenerateResult result;
  result.finish_reason = "length";
  KVCache cache;
  std::vector<int64_t> sequence = prompt;
  auto t0 = clock::now();
  ModelInput in;
  in.input_ids = at::tensor(prompt, at::kLong).view({1, -1}).to(long_opts.device());
  in.cache = options.use_cache ? &cache : nullptr;
  at::Tensor logits = model.forward(in);  // (1, T, V)
  auto t1 = clock::now();
  result.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();
  for (int64_t step = 0; step < options.max_tokens; ++step) {
    const int64_t token = sampler.sample(logits[0][logits.size(1) - 1]);
    result.tokens.push_back(token);
    sequence.push_back(token);
    if (std::find(stops.begin(), stops.end(), token) != stops.end()) {
      result.finish_reason = "stop";
      break;
    }
    if (on_token && !on_token(token)) {
      result.finish_reason = "callback";
      break;
    }
    if (step + 1 == options.max_tokens || static_cast<int64_t>(sequence.size()) >= config.max_position) break;
    if (options.use_cache) {
      in.input_ids = at::full({1, 1}, token, long_opts);
    } else {
      in.input_ids = at::tensor(sequence, at::kLong).view({1, -1}).to(long_opts.device());
    }
    logits = model.forward(in);
  }
  result.decode_seconds = std::chrono::duration<double>(clock::now() - t1).count();
  return result;
}

}  // namespace mdl
