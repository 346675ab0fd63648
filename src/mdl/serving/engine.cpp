#include "mdl/serving/engine.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>

#include "mdl/aggregation/composition.h"
#include "mdl/aggregation/merge.h"
#include "mdl/core/error.h"
#include "mdl/core/hash.h"
#include "mdl/core/log.h"
#include "mdl/modules/module_set.h"
#include "mdl/modules/module_type.h"
#include "mdl/serving/module_cache.h"
#include "mdl/serving/request_error.h"
#include "mdl/tokenizers/unicode.h"

namespace mdl {
namespace fs = std::filesystem;

struct Engine::Sequence {
  CompletionRequest req;
  std::promise<CompletionResult> promise;
  CompletionResult result;
  std::unique_ptr<Sampler> sampler;
  std::vector<int64_t> stop_tokens;
  std::vector<std::string> pinned;  // module names pinned in the cache until the sequence finishes
  int64_t next_position = 0;        // position id of the next token fed to the model
  int64_t last_token = -1;
  size_t streamed = 0;  // bytes of text already streamed (a character boundary)
  bool done = false;
  std::chrono::steady_clock::time_point queued, last_token_at;  // for the latency histograms
  std::string usage_key;                                        // its module label in EngineStats::modules
};

const std::vector<double>& LatencyHistogram::bounds() {
  static const std::vector<double> b = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
  return b;
}

void LatencyHistogram::add(double seconds) {
  const auto& b = bounds();
  counts[static_cast<size_t>(std::lower_bound(b.begin(), b.end(), seconds) - b.begin())] += 1;
  sum += seconds;
  ++count;
}

namespace {

/// (B, H, S, D) -> (B, H, n + S, D) with zeros in front; (B, S) -> (B, n + S).
at::Tensor pad_front(const at::Tensor& t, int64_t n) {
  if (n == 0) return t;
  return t.dim() == 4 ? at::constant_pad_nd(t, {0, 0, n, 0}) : at::constant_pad_nd(t, {n, 0});
}

}  // namespace

Engine::Engine(Model model, Tokenizer tokenizer, EngineOptions options)
    : model_(std::move(model)), tokenizer_(std::move(tokenizer)), options_(std::move(options)) {
  MDL_CHECK(options_.lora_bank_dtype == "float16" || options_.lora_bank_dtype == "float32",
            "[serve] --lora-bank-dtype must be float16 or float32, got '", options_.lora_bank_dtype, "'");
  MDL_CHECK(options_.max_batch > 0 && options_.max_queue > 0,
            "[serve] max batch and max queue must be > 0, got ", options_.max_batch, " and ",
            options_.max_queue);
  model_->eval();
  for (auto& p : model_->parameters()) p.set_requires_grad(false);
  lora_dtype_ = options_.lora_bank_dtype == "float16" ? at::kHalf : at::kFloat;
  set_ = std::make_unique<ModuleSet>(model_);
  set_->set_lora_bank_storage(
      lora_dtype_);  // prefill and decoding read one bank, never restacked between them
  ModuleCacheOptions co;
  co.modules_dir = options_.modules_dir;
  co.budget_bytes = options_.module_cache_mb << 20;
  co.lora_dtype = lora_dtype_;
  cache_ = std::make_unique<ModuleCache>(*set_, co);
  thread_ = std::thread([this] { loop(); });
}

Engine::~Engine() {
  drain();
}

// ---- modules -------------------------------------------------------------------------------------------

std::vector<ModuleChoice> Engine::resolve(const std::string& expression,
                                          const std::vector<ModuleChoice>& extra) {
  // 1. Without the lock: the leaves in application order, merges computed (file I/O and arithmetic), by
  // the one composition interpreter the CLI uses too.
  struct Leaf {
    std::string name, dir;  // dir: a merge's output (else where the cache finds the name)
    double scale = 1.0;
    std::string within;  // "avg" or "a sum": must be an additive module
  };
  std::vector<Leaf> leaves;
  if (!expression.empty() && expression != "base") {
    std::vector<CompositionLeaf> plan;
    try {
      ComposeOptions co;
      co.model_dir = options_.model_dir;
      co.modules_dir = options_.modules_dir;
      plan = plan_composition(parse_composition(expression), co);
    } catch (const RequestError&) {
      throw;
    } catch (const Error& e) {
      throw RequestError(400, "model", e.what());
    }
    for (const auto& l : plan) {
      if (l.kind == CompositionLeaf::Kind::fuse)
        throw RequestError(400, "model",
                           "[serve] fuse(...) creates a new fusion that needs training; serve a "
                           "trained fusion by its directory name");
      leaves.push_back({l.name, l.dir, l.scale, l.within});
    }
  }
  for (const auto& e : extra) leaves.push_back({e.name, "", e.scale, ""});
  for (const auto& l : leaves)
    if (!std::isfinite(l.scale))
      throw RequestError(400, "model",
                         "[serve] module '" + l.name + "' gets a scale of " + std::to_string(l.scale) +
                             "; scales must be finite");

  // 2. Read what is not in memory without the lock, so that decoding goes on during file I/O.
  std::vector<std::pair<std::string, std::string>> missing;  // name, directory
  {
    std::lock_guard<std::mutex> lk(model_mu_);
    for (const auto& l : leaves)
      if (!cache_->resident(l.name)) missing.emplace_back(l.name, cache_->locate(l.name, l.dir));
  }
  std::vector<std::pair<std::string, ModuleFiles>> read;
  for (const auto& [name, dir] : missing)
    read.emplace_back(name, set_->read(dir));  // reads only the model's config and sites

  // 3. Under the lock: attach, make resident (touching the LRU) without pinning (submit() pins), check.
  std::lock_guard<std::mutex> lk(model_mu_);
  for (const auto& [name, files] : read) cache_->insert(name, files);
  std::vector<ModuleChoice> out;
  for (const auto& l : leaves) {
    cache_->acquire(l.name, l.dir);
    cache_->release(l.name);
    const std::string& type = set_->config(l.name).type;
    const SiteKind kind = module_type(type).site_kind;
    if (kind == SiteKind::embedding || kind == SiteKind::attention_kv)
      throw RequestError(400, "model",
                         "[serve] module '" + l.name + "' is " + type +
                             " tuning: it lengthens every row's "
                             "sequence, so it cannot share a batch; merge it or serve it on its own server");
    if (!l.within.empty() && !module_type(type).additive)
      throw RequestError(400, "model",
                         "[serve] '" + l.name + "' is a " + type + " module; " + l.within +
                             " combines "
                             "additive modules (LoRA, sparse, BitFit); use stack(...) or a merge");
    out.push_back({l.name, l.scale});
  }
  return out;
}

void Engine::load_module(const std::string& name, const std::string& path) {
  try {
    check_module_name(name);
  } catch (const Error& e) {
    throw RequestError(400, "name", e.what());
  }
  if (name == "base")
    throw RequestError(409, "name", "[serve] 'base' names the base model; choose another module name");
  // The path resolves, links followed, inside the modules directory or a directory the operator allowed.
  std::error_code ec;
  fs::path wanted(path);
  if (wanted.is_relative() && !options_.modules_dir.empty()) wanted = fs::path(options_.modules_dir) / wanted;
  const fs::path real = fs::canonical(wanted, ec);
  if (ec) throw RequestError(400, "path", "[serve] cannot load '" + path + "': " + ec.message());
  std::vector<std::string> roots = options_.allowed_module_paths;
  if (!options_.modules_dir.empty()) roots.insert(roots.begin(), options_.modules_dir);
  const bool inside = std::any_of(roots.begin(), roots.end(), [&](const std::string& root) {
    std::error_code rec;
    const fs::path r = fs::canonical(root, rec);
    if (rec) return false;
    const auto rel = real.lexically_relative(r);
    return !rel.empty() && *rel.begin() != "..";
  });
  if (!inside)
    throw RequestError(403, "path",
                       "[serve] '" + path + "' is outside the directories this server loads modules from (" +
                           (roots.empty() ? std::string("none") : roots[0]) +
                           (roots.size() > 1 ? ", ..." : "") +
                           "); the operator can allow another with --allow-module-path DIR");
  if (!is_module_dir(real.string()))
    throw RequestError(400, "path",
                       "[serve] '" + path +
                           "' is not a module directory (no module.json, adapter_config.json "
                           "or AdapterHub files)");
  {
    std::lock_guard<std::mutex> lk(model_mu_);
    const auto offered = cache_->available();
    if (std::find(offered.begin(), offered.end(), name) != offered.end())
      throw RequestError(409, "name",
                         "[serve] a module named '" + name + "' is already " +
                             (cache_->resident(name) ? "loaded" : "offered by the modules directory") +
                             "; choose another name (or unload it first)");
  }
  ModuleFiles files;
  try {
    files = set_->read(real.string());  // without the lock: only the model's config and sites are read
  } catch (const Error& e) {
    throw RequestError(400, "path", e.what());
  }
  std::lock_guard<std::mutex> lk(model_mu_);
  cache_->load(name, files);
  roots_[name] = real.string();
}

std::string Engine::module_root(const std::string& name) {
  std::lock_guard<std::mutex> lk(model_mu_);
  if (const auto it = roots_.find(name); it != roots_.end()) return it->second;
  return options_.modules_dir.empty() ? name : (fs::path(options_.modules_dir) / name).string();
}

void Engine::unload_module(const std::string& name) {
  std::lock_guard<std::mutex> lk(model_mu_);
  cache_->unload(name);
  roots_.erase(name);
}

std::vector<std::string> Engine::modules() {
  std::lock_guard<std::mutex> lk(model_mu_);
  return cache_->available();
}

EngineStats Engine::stats() {
  EngineStats s;
  {
    std::lock_guard<std::mutex> lk(queue_mu_);
    s = stats_;
  }
  std::lock_guard<std::mutex> lk(model_mu_);
  const ModuleCacheStats& c = cache_->stats();
  s.cache_hits = c.hits, s.cache_misses = c.misses, s.cache_evictions = c.evictions, s.cache_bytes = c.bytes;
  s.modules_loaded = c.loaded;
  return s;
}

// ---- generation ----------------------------------------------------------------------------------------

std::shared_ptr<Engine::Sequence> Engine::prepare(CompletionRequest request) {
  const ModelConfig& cfg = model_->config();
  if (cfg.head != HeadKind::causal_lm)
    throw RequestError(400, "model",
                       "[serve] the base model (" + cfg.architecture +
                           ") has no causal LM head; use "
                           "/v1/classify or /v1/embeddings");
  if (request.prompt.empty()) throw RequestError(400, "prompt", "[serve] the prompt is empty");
  if (static_cast<int64_t>(request.prompt.size()) >= cfg.max_position)
    throw RequestError(400, "prompt",
                       "[serve] the prompt has " + std::to_string(request.prompt.size()) +
                           " tokens; the context holds " + std::to_string(cfg.max_position) +
                           " positions, and one is needed for the answer");
  try {
    validate(request.sampling);
  } catch (const Error& e) {
    throw RequestError(400, "sampling", e.what());
  }
  auto s = std::make_shared<Sequence>();
  s->sampler = std::make_unique<Sampler>(request.sampling);
  s->stop_tokens = request.sampling.ignore_eos               ? std::vector<int64_t>{}
                   : request.sampling.stop_token_ids.empty() ? cfg.eos_token_ids
                                                             : request.sampling.stop_token_ids;
  s->result.prompt_tokens = static_cast<int64_t>(request.prompt.size());
  s->req = std::move(request);
  {
    std::lock_guard<std::mutex> lk(model_mu_);
    for (const auto& c : s->req.modules) {
      cache_->acquire(c.name);  // reloads a module evicted since resolve()
      s->pinned.push_back(c.name);
    }
  }
  return s;
}

std::future<CompletionResult> Engine::submit(CompletionRequest request) {
  auto s = prepare(std::move(request));
  std::future<CompletionResult> f = s->promise.get_future();
  enqueue({s});
  return f;
}

std::vector<std::future<CompletionResult>> Engine::submit(std::vector<CompletionRequest> requests) {
  std::vector<std::shared_ptr<Sequence>> seqs;
  try {
    for (auto& r : requests) seqs.push_back(prepare(std::move(r)));
  } catch (...) {  // none is queued: release the pins taken so far
    unpin(seqs);
    throw;
  }
  std::vector<std::future<CompletionResult>> out;
  for (const auto& s : seqs) out.push_back(s->promise.get_future());
  enqueue(seqs);
  return out;
}

void Engine::unpin(const std::vector<std::shared_ptr<Sequence>>& seqs) {
  std::lock_guard<std::mutex> mk(model_mu_);
  for (const auto& s : seqs)
    for (const auto& n : s->pinned) cache_->release(n);
}

void Engine::enqueue(const std::vector<std::shared_ptr<Sequence>>& seqs) {
  std::string refusal;
  {
    std::lock_guard<std::mutex> lk(queue_mu_);
    if (draining_)
      refusal = "[serve] the server is shutting down";
    else if (static_cast<int64_t>(waiting_.size() + seqs.size()) > options_.max_queue)
      refusal = "[serve] the queue is full (" + std::to_string(options_.max_queue) +
                " waiting requests); retry later";
    if (refusal.empty()) {
      const auto now = std::chrono::steady_clock::now();
      for (const auto& s : seqs) {
        ++stats_.requests;
        stats_.prompt_tokens += s->result.prompt_tokens;
        s->queued = now;
        // A bounded set of labels: the first 64 module names, then "other".
        std::string key;
        for (const auto& m : s->req.modules) key += (key.empty() ? "" : "+") + m.name;
        if (key.empty()) key = "base";
        if (!stats_.modules.count(key) && stats_.modules.size() >= 64) key = "other";
        s->usage_key = key;
        ++stats_.modules[key].requests;
        waiting_.push_back(s);
      }
      stats_.queue_length = static_cast<int64_t>(waiting_.size());
    } else {
      stats_.rejected += static_cast<int64_t>(seqs.size());
    }
  }
  if (!refusal.empty()) {  // lock order is model, then queue: the pins are released after the queue lock
    unpin(seqs);
    throw RequestError(503, "", refusal);
  }
  wake_.notify_one();
}

void Engine::loop() {
  for (;;) {
    std::vector<std::shared_ptr<Sequence>> fresh;
    {
      std::unique_lock<std::mutex> lk(queue_mu_);
      wake_.wait(lk, [&] { return !waiting_.empty() || !running_.empty() || draining_; });
      if (draining_ && waiting_.empty() && running_.empty()) return;
      const auto now = std::chrono::steady_clock::now();
      while (!waiting_.empty() && static_cast<int64_t>(running_.size() + fresh.size()) < options_.max_batch) {
        fresh.push_back(waiting_.front());
        waiting_.pop_front();
        stats_.queue_time.add(std::chrono::duration<double>(now - fresh.back()->queued).count());
      }
      stats_.queue_length = static_cast<int64_t>(waiting_.size());
    }
    std::lock_guard<std::mutex> lk(model_mu_);
    torch::NoGradGuard no_grad;
    const auto t0 = std::chrono::steady_clock::now();
    admit(fresh);
    if (!running_.empty()) decode();
    retire();
    std::lock_guard<std::mutex> qk(queue_mu_);
    stats_.busy_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    stats_.running = static_cast<int64_t>(running_.size());
  }
}

void Engine::admit(std::vector<std::shared_ptr<Sequence>>& fresh) {
  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(model_->device());
  for (auto& s : fresh) {
    try {
      // Prefill alone: its prompt, its modules, a cache of its own.
      KVCache one;
      RoutingContext rc;
      rc.modules = {s->req.modules};
      ModelInput in;
      in.input_ids = at::tensor(s->req.prompt, at::kLong).view({1, -1}).to(long_opts.device());
      in.cache = &one;
      in.routing = &rc;
      at::Tensor logits = model_->forward(in);  // (1, T, V)
      const int64_t T = in.input_ids.size(1);
      s->next_position = T;
      if (!emit(*s, s->sampler->sample(logits[0][T - 1]))) continue;
      // Join the batch: both caches left-padded to a common length, the padding masked.
      const int64_t S = cache_kv_.length(), S1 = one.length(), L = std::max(S, S1);
      at::Tensor row_mask = at::ones({1, S1}, long_opts);
      if (running_.empty()) {
        cache_kv_ = one;
        mask_ = row_mask;
      } else {
        for (size_t i = 0; i < cache_kv_.k.size(); ++i) {
          cache_kv_.k[i] = at::cat({pad_front(cache_kv_.k[i], L - S), pad_front(one.k[i], L - S1)}, 0);
          cache_kv_.v[i] = at::cat({pad_front(cache_kv_.v[i], L - S), pad_front(one.v[i], L - S1)}, 0);
        }
        mask_ = at::cat({pad_front(mask_, L - S), pad_front(row_mask, L - S1)}, 0);
      }
      running_.push_back(s);
    } catch (const std::exception& e) {  // this request fails; the others go on
      finish(*s, "error", e.what());
    }
  }
}

void Engine::decode() {
  const auto long_opts = at::TensorOptions().dtype(at::kLong).device(model_->device());
  const int64_t B = static_cast<int64_t>(running_.size());
  std::vector<int64_t> tokens, positions;
  RoutingContext rc;
  for (const auto& s : running_) {
    tokens.push_back(s->last_token), positions.push_back(s->next_position);
    rc.modules.push_back(s->req.modules);
  }
  try {
    ModelInput in;
    in.input_ids = at::tensor(tokens, at::kLong).view({B, 1}).to(long_opts.device());
    in.position_ids = at::tensor(positions, at::kLong).view({B, 1}).to(long_opts.device());
    at::Tensor mask = at::cat({mask_, at::ones({B, 1}, long_opts)}, 1);  // (B, S + 1)
    in.attention_mask = mask;
    in.cache = &cache_kv_;
    in.routing = &rc;
    at::Tensor logits = model_->forward(in).select(1, 0);  // (B, V)
    mask_ = mask;
    {
      std::lock_guard<std::mutex> lk(queue_mu_);
      ++stats_.decode_steps;
      stats_.decode_rows += B;
    }
    for (int64_t b = 0; b < B; ++b) {
      Sequence& s = *running_[static_cast<size_t>(b)];
      ++s.next_position;
      emit(s, s.sampler->sample(logits[b]));
    }
  } catch (const std::exception& e) {  // a failed batch step fails its rows, never the server
    log_error(std::string("[serve] decode step failed: ") + e.what());
    for (auto& s : running_)
      if (!s->done) finish(*s, "error", e.what());
  }
}

bool Engine::emit(Sequence& s, int64_t token) {
  s.last_token = token;
  s.result.tokens.push_back(token);
  if (s.req.sampling.logprobs >= 0) s.result.logprobs.push_back(s.sampler->last());
  {
    const auto now = std::chrono::steady_clock::now();
    std::lock_guard<std::mutex> lk(queue_mu_);
    ++stats_.generated_tokens;
    ++stats_.modules[s.usage_key].generated_tokens;
    if (s.result.tokens.size() == 1)
      stats_.time_to_first_token.add(std::chrono::duration<double>(now - s.queued).count());
    else
      stats_.token_latency.add(std::chrono::duration<double>(now - s.last_token_at).count());
    s.last_token_at = now;
  }
  const bool stop_token = std::find(s.stop_tokens.begin(), s.stop_tokens.end(), token) != s.stop_tokens.end();
  std::vector<int64_t> visible = s.result.tokens;
  if (stop_token) visible.pop_back();
  std::string text = tokenizer_.decode(visible);
  // The earliest stop sequence ends the text.
  size_t cut = std::string::npos, hold = 0;
  for (const auto& stop : s.req.stop) {
    if (stop.empty()) continue;
    cut = std::min(cut, text.find(stop));
    hold = std::max(hold, stop.size() - 1);
  }
  const bool stop_sequence = cut != std::string::npos;
  if (stop_sequence) text.resize(cut);
  const bool length =
      static_cast<int64_t>(s.result.tokens.size()) >= s.req.sampling.max_tokens ||
      s.result.prompt_tokens + static_cast<int64_t>(s.result.tokens.size()) >= model_->config().max_position;
  const bool last = stop_token || stop_sequence || length;
  // Stream what can no longer change: not a partial character or byte sequence, not what may start a
  // stop sequence, and never half a character.
  size_t ready = text.size();
  if (!last)
    ready = unicode::char_boundary(
        text, std::min(tokenizer_.stable_length(visible, text), ready > hold ? ready - hold : 0));
  if (s.req.on_text && ready > s.streamed) {
    // valid_utf8: a decoder that rewrote text already sent (none known) would leave s.streamed inside a
    // character; the chunk is then repaired rather than sent as invalid UTF-8.
    const bool keep = s.req.on_text(unicode::valid_utf8(text.substr(s.streamed, ready - s.streamed)));
    s.streamed = ready;
    if (!keep) {
      s.result.text = text;
      finish(s, "cancelled");
      return false;
    }
  }
  if (!last) return true;
  s.result.text = text;
  finish(s, stop_token || stop_sequence ? "stop" : "length");
  return false;
}

void Engine::finish(Sequence& s, const std::string& reason, const std::string& error) {
  if (s.done) return;
  s.done = true;
  s.result.finish_reason = reason;
  s.result.error = error;
  for (const auto& n : s.pinned) cache_->release(n);  // model_mu_ is held by the engine thread
  {
    std::lock_guard<std::mutex> lk(queue_mu_);
    if (reason == "error")
      ++stats_.failed;
    else if (reason == "cancelled")
      ++stats_.cancelled;
    else
      ++stats_.completed;
  }
  s.promise.set_value(s.result);
}

void Engine::retire() {
  std::vector<int64_t> keep;
  for (size_t i = 0; i < running_.size(); ++i)
    if (!running_[i]->done) keep.push_back(static_cast<int64_t>(i));
  if (keep.size() == running_.size()) return;
  std::vector<std::shared_ptr<Sequence>> still;
  for (int64_t i : keep) still.push_back(running_[static_cast<size_t>(i)]);
  running_ = std::move(still);
  if (running_.empty()) {
    cache_kv_.clear();
    mask_ = at::Tensor();
    return;
  }
  at::Tensor idx = at::tensor(keep, at::kLong).to(mask_.device());
  mask_ = mask_.index_select(0, idx);
  // Drop the leading positions no remaining row uses.
  const int64_t first = mask_.any(0).to(at::kLong).argmax().item<int64_t>();
  mask_ = mask_.narrow(1, first, mask_.size(1) - first);
  for (size_t i = 0; i < cache_kv_.k.size(); ++i) {
    cache_kv_.k[i] = cache_kv_.k[i].index_select(0, idx).narrow(2, first, mask_.size(1));
    cache_kv_.v[i] = cache_kv_.v[i].index_select(0, idx).narrow(2, first, mask_.size(1));
  }
}

void Engine::drain() {
  {
    std::lock_guard<std::mutex> lk(queue_mu_);
    draining_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

// ---- encoders ------------------------------------------------------------------------------------------

at::Tensor Engine::run_encoder(const std::vector<std::string>& texts,
                               const std::vector<ModuleChoice>& modules, bool pooled) {
  if (texts.empty())
    throw RequestError(400, "input", "[serve] 'input' is empty; give a string or a list of strings");
  std::vector<std::vector<int64_t>> ids;
  int64_t T = 0;
  for (const auto& t : texts) {
    ids.push_back(tokenizer_.encode(t));
    if (ids.back().empty()) ids.back().push_back(std::max<int64_t>(0, model_->config().pad_token_id));
    if (static_cast<int64_t>(ids.back().size()) > model_->config().max_position)
      throw RequestError(400, "input",
                         "[serve] input " + std::to_string(ids.size() - 1) + " has " +
                             std::to_string(ids.back().size()) + " tokens; the context holds " +
                             std::to_string(model_->config().max_position));
    T = std::max<int64_t>(T, static_cast<int64_t>(ids.back().size()));
  }
  const int64_t N = static_cast<int64_t>(texts.size());
  at::Tensor input = at::full({N, T}, std::max<int64_t>(0, model_->config().pad_token_id), at::kLong);
  at::Tensor mask = at::zeros({N, T}, at::kLong);
  for (int64_t i = 0; i < N; ++i) {
    const auto n = static_cast<int64_t>(ids[static_cast<size_t>(i)].size());
    input[i].narrow(0, 0, n).copy_(at::tensor(ids[static_cast<size_t>(i)], at::kLong));
    mask[i].narrow(0, 0, n).fill_(1);
  }
  std::lock_guard<std::mutex> lk(model_mu_);
  torch::NoGradGuard no_grad;
  RoutingContext rc;
  rc.modules.assign(static_cast<size_t>(N), modules);
  ModelInput in;
  in.input_ids = input.to(model_->device());
  in.attention_mask = mask.to(model_->device());
  in.routing = &rc;
  if (!pooled) return model_->forward(in).to(at::kCPU, at::kFloat);
  at::Tensor h = model_->encode(in).to(at::kFloat);  // (N, T, C)
  at::Tensor m = in.attention_mask.to(at::kFloat).unsqueeze(-1);
  return ((h * m).sum(1) / m.sum(1)).to(at::kCPU);
}

at::Tensor Engine::classify(const std::vector<std::string>& texts, const std::vector<ModuleChoice>& modules) {
  if (model_->config().head != HeadKind::sequence_classification)
    throw RequestError(
        400, "model",
        "[serve] the base model (" + model_->config().architecture + ") has no sequence classification head");
  return run_encoder(texts, modules, false);
}

at::Tensor Engine::embed(const std::vector<std::string>& texts, const std::vector<ModuleChoice>& modules) {
  return run_encoder(texts, modules, true);
}

std::vector<std::string> Engine::labels(const std::vector<ModuleChoice>& modules) {
  std::vector<std::string> names;
  std::lock_guard<std::mutex> lock(model_mu_);
  for (const auto& m : modules)
    if (set_->contains(m.name)) names.push_back(m.name);
  if (names.empty()) return {};
  try {
    return set_->labels(names);
  } catch (const Error& e) {
    throw RequestError(400, "model", e.what());
  }
}

}  // namespace mdl
