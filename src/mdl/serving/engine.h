// The inference engine: one base model, many modules, many requests at once.
//
//   submit(request) ─► waiting queue ─► engine thread, each iteration:
//     admit: up to max_batch running sequences; a new one is prefilled alone (its prompt, its modules)
//            and its keys/values joined into the batch's KV cache (left-padded, masked)
//     decode: ONE forward for every running sequence, (B, 1) tokens with per-row positions and a
//            RoutingContext naming each row's modules; LoRAs of different rows go through the site's
//            gathered bank (LoraBank), other modules through per-row subsets
//     sample per row (its own seeded Sampler), stream text, finish rows on a stop token, a stop
//            sequence, max tokens or the context end; finished rows leave the batch
//
// Requests name modules as a list with scales or as a composition expression (resolve()): leaves and
// merges become per-row module choices, so requests with different modules share every batch. Module
// directories load on demand into a ModuleCache bounded by a memory budget.
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "mdl/backbones/generate.h"
#include "mdl/backbones/model.h"
#include "mdl/routing/routing_context.h"
#include "mdl/tokenizers/tokenizer.h"

namespace mdl {

class ModuleSet;
class ModuleCache;

struct EngineOptions {
  std::string model_dir;           ///< the base checkpoint (merges are computed against it)
  std::string modules_dir;         ///< module directories by name; empty: only explicitly loaded modules
  int64_t max_batch = 32;          ///< running sequences at most
  int64_t max_queue = 1024;        ///< waiting requests at most (more: refused, HTTP 503)
  int64_t module_cache_mb = 1024;  ///< memory budget of the module cache
  /// How LoRA factors are held. "float16": rounded to float16 values on load, and the stacked bank a
  /// decoding step with different LoRAs per row reads stores them in float16, half the bytes of float32
  /// (the step is bound by them); a request computes with the same weights in any batch. "float32":
  /// the factors as the files hold them.
  std::string lora_bank_dtype = "float16";
  /// Directories besides modules_dir that load_module (POST /v1/modules) may read; paths resolve with
  /// links followed and must lie inside one of them.
  std::vector<std::string> allowed_module_paths;
};

/// One generation request, with its modules already resolved.
struct CompletionRequest {
  std::vector<int64_t> prompt;
  GenerateOptions sampling;
  std::vector<ModuleChoice> modules;  ///< what this request's rows use (empty: the base model)
  std::vector<std::string> stop;      ///< stop sequences (text); the text ends before the first one
  /// Streaming: called on the engine thread with each new piece of text; returning false cancels.
  std::function<bool(const std::string&)> on_text;
};

struct CompletionResult {
  std::vector<int64_t> tokens;
  std::string text;
  std::string finish_reason;  ///< stop | length | cancelled | error
  int64_t prompt_tokens = 0;
  std::string error;  ///< set when finish_reason is "error"
  /// with sampling.logprobs >= 0: one entry per token of `tokens`
  std::vector<TokenLogprob> logprobs;
};

/// Counters for /metrics.
/// A latency histogram with Prometheus's cumulative buckets (seconds).
struct LatencyHistogram {
  static const std::vector<double>& bounds();  ///< upper bounds of the buckets, +Inf implied
  std::vector<int64_t> counts = std::vector<int64_t>(bounds().size() + 1, 0);  ///< per bucket, last: +Inf
  double sum = 0;
  int64_t count = 0;
  void add(double seconds);
};

/// Requests and tokens of one module (labelled metrics).
struct ModuleUsage {
  int64_t requests = 0, generated_tokens = 0;
};

struct EngineStats {
  int64_t requests = 0, completed = 0, failed = 0, cancelled = 0, rejected = 0;
  int64_t prompt_tokens = 0, generated_tokens = 0;
  int64_t decode_steps = 0, decode_rows = 0;  ///< rows summed over steps: mean batch = rows / steps
  int64_t queue_length = 0, running = 0;
  double busy_seconds = 0;  ///< time spent in forwards
  int64_t cache_hits = 0, cache_misses = 0, cache_evictions = 0, cache_bytes = 0, modules_loaded = 0;
  LatencyHistogram time_to_first_token;  ///< from queueing to the first token
  LatencyHistogram token_latency;        ///< between a sequence's consecutive tokens
  LatencyHistogram queue_time;           ///< from queueing to joining the running batch
  /// per module name (the first 64 seen; later ones count under "other"); "base" for requests without
  std::map<std::string, ModuleUsage> modules;
};

class Engine {
 public:
  Engine(Model model, Tokenizer tokenizer, EngineOptions options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const ModelConfig& config() const { return model_->config(); }
  const Tokenizer& tokenizer() const { return tokenizer_; }

  /// Module choices from a composition expression ("base" or empty: none), plus `extra` choices;
  /// loads what is missing. Throws (a client error) naming the unknown module or the unsupported form.
  std::vector<ModuleChoice> resolve(const std::string& expression,
                                    const std::vector<ModuleChoice>& extra = {});

  /// Queues a generation; the future is set when it finishes. Throws when the queue is full or the
  /// engine is draining.
  std::future<CompletionResult> submit(CompletionRequest request);
  /// Queues requests that arrive together, so that they join the same decoding step (offline batch
  /// inference; benchmarks). All are checked first: a bad one throws and none is queued.
  std::vector<std::future<CompletionResult>> submit(std::vector<CompletionRequest> requests);

  /// Encoders and classifiers, run at once (no queue): sequence classification logits (N, L), or
  /// mean-pooled final hidden states (N, C) for embeddings, one row per text.
  at::Tensor classify(const std::vector<std::string>& texts, const std::vector<ModuleChoice>& modules);
  at::Tensor embed(const std::vector<std::string>& texts, const std::vector<ModuleChoice>& modules);
  /// The class names the chosen modules were trained with (ModuleConfig::labels; empty when none has
  /// any); throws a client error when two disagree.
  std::vector<std::string> labels(const std::vector<ModuleChoice>& modules);

  /// Loads the module directory `path` as `name` (POST /v1/modules): `path` must lie inside modules_dir or
  /// an allowed directory, `name` must be new (not loaded, not offered by modules_dir, not "base"). The
  /// files are read without the lock that decoding holds. Throws RequestError naming the field.
  void load_module(const std::string& name, const std::string& path);
  void unload_module(const std::string& name);
  /// The directory module `name` was loaded from (load_module's path, resolved), or where the modules
  /// directory offers it.
  std::string module_root(const std::string& name);
  /// Loaded modules and those the modules directory offers.
  std::vector<std::string> modules();

  EngineStats stats();
  /// Stops accepting, finishes every queued and running request, joins the engine thread.
  void drain();

 private:
  struct Sequence;
  std::shared_ptr<Sequence> prepare(CompletionRequest request);           // checks and pins its modules
  void enqueue(const std::vector<std::shared_ptr<Sequence>>& sequences);  // all or none; refused: unpinned
  void unpin(const std::vector<std::shared_ptr<Sequence>>& sequences);    // releases their module pins
  void loop();
  void admit(std::vector<std::shared_ptr<Sequence>>& fresh);
  void decode();
  void finish(Sequence& s, const std::string& reason, const std::string& error = "");
  bool emit(Sequence& s, int64_t token);  // false: the row is done
  void retire();
  at::Tensor run_encoder(const std::vector<std::string>& texts, const std::vector<ModuleChoice>& modules,
                         bool pooled);

  Model model_;
  Tokenizer tokenizer_;
  EngineOptions options_;
  at::ScalarType lora_dtype_ = at::kHalf;  // options_.lora_bank_dtype, parsed
  std::unique_ptr<ModuleSet> set_;
  std::unique_ptr<ModuleCache> cache_;
  std::map<std::string, std::string> roots_;  // module -> directory, for modules loaded at run time
  std::mutex model_mu_;                       // the model, module set and cache

  std::mutex queue_mu_;  // waiting_, stats_, draining_
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Sequence>> waiting_;
  bool draining_ = false;
  EngineStats stats_;

  // Owned by the engine thread.
  std::vector<std::shared_ptr<Sequence>> running_;
  KVCache cache_kv_;
  at::Tensor mask_;  // (B, S) 1 = a real cached position of that row
  std::thread thread_;
};

}  // namespace mdl
