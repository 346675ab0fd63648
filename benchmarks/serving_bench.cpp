// Serving issue benchmark: 32 concurrent generation requests on the small Llama through the Engine
// (continuous batching), each with a different LoRA r=16 on every projection, vs all with the same
// LoRA (with the engine's default float16 LoRA bank, and the exact float32 one), vs the merged model, vs
// one request (one module) at a time as PEFT and llama.cpp serve them. Throughput in generated tokens per
// second, from one run: medians of 7 alternating rounds.
#include <ATen/ATen.h>
#include <torch/utils.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <vector>

#include "harness.h"
#include "mdl/backbones/init_model.h"
#include "mdl/modules/module_set.h"
#include "mdl/serving/engine.h"

namespace mdl::bench {
namespace {

namespace fs = std::filesystem;

struct Fixture {
  std::string root, model, merged, modules;
  Fixture(int64_t loras) {
    root = (fs::temp_directory_path() / ("mdl-serving-bench-" + std::to_string(::getpid()))).string();
    model = root + "/model", merged = root + "/merged", modules = root + "/modules";
    InitModelOptions o;
    o.arch = "llama";
    o.preset = "small";
    o.seed = 1;
    init_model(o, model);
    ModuleSet set(load_model(model));
    for (int64_t i = 0; i < loras; ++i) {
      ModuleConfig c;
      c.lora.r = 16;
      c.lora.alpha = 32;
      c.lora.init = "random";
      c.seed = static_cast<uint64_t>(i + 1);
      c.targets.target_modules = {"all-linear"};
      const std::string name = "lora" + std::to_string(i);
      set.add(name, c);
      set.save(name, modules + "/" + name);
      if (i == 0) {
        set.merge(name);
        save_model(*set.model(), merged);
        for (const char* f : {"tokenizer.json", "tokenizer_config.json"})
          if (fs::exists(fs::path(model) / f)) fs::copy_file(fs::path(model) / f, fs::path(merged) / f);
        set.unmerge(name);
      }
      set.remove(name);
    }
  }
  ~Fixture() {
    std::error_code ec;
    fs::remove_all(root, ec);
  }
};

/// An engine over `model_dir` and a timed run: `requests` submitted at once, request i using modules[i].
struct Bench {
  Engine engine;
  std::vector<std::string> modules;
  int64_t max_tokens;
  Bench(const std::string& model_dir, const std::string& modules_dir, int64_t max_batch,
        std::vector<std::string> mods, int64_t max_tokens_, const std::string& bank_dtype = "float16")
      : engine(load_model(model_dir), Tokenizer::from_file(model_dir),
               options(model_dir, modules_dir, max_batch, bank_dtype)),
        modules(std::move(mods)),
        max_tokens(max_tokens_) {
    run();  // warm-up: modules loaded, allocator warm
  }
  static EngineOptions options(const std::string& model_dir, const std::string& modules_dir,
                               int64_t max_batch, const std::string& bank_dtype) {
    EngineOptions o;
    o.model_dir = model_dir;
    o.modules_dir = modules_dir;
    o.max_batch = max_batch;
    o.lora_bank_dtype = bank_dtype;
    return o;
  }
  /// Generated tokens per second.
  double run() {
    std::vector<CompletionRequest> requests;
    for (size_t i = 0; i < modules.size(); ++i) {
      CompletionRequest r;
      r.prompt.clear();
      for (int64_t t = 0; t < 16; ++t) r.prompt.push_back(3 + static_cast<int64_t>((i * 7 + t * 13) % 500));
      r.sampling.max_tokens = max_tokens;
      r.sampling.temperature = 0.0;
      r.sampling.stop_token_ids = {-1};  // no early stop: every request generates max_tokens
      r.modules = engine.resolve(modules[i]);
      requests.push_back(std::move(r));
    }
    // Submitted together, so every setup decodes the same steps (one at a time, a request would join
    // whichever step the engine thread is at when it arrives, and the step count would vary run to run).
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::future<CompletionResult>> out = engine.submit(std::move(requests));
    int64_t tokens = 0;
    for (auto& f : out) tokens += static_cast<int64_t>(f.get().tokens.size());
    return static_cast<double>(tokens) /
           std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void serving(const Settings& s, Report& r) {
  const int64_t n = s.quick ? 4 : 32, max_tokens = s.quick ? 4 : 32;
  Fixture f(n);
  std::vector<std::string> distinct, same(static_cast<size_t>(n), "lora0"),
      base(static_cast<size_t>(n), "base");
  for (int64_t i = 0; i < n; ++i) distinct.push_back("lora" + std::to_string(i));
  Bench bd(f.model, f.modules, n, distinct, max_tokens),
      bd32(f.model, f.modules, n, distinct, max_tokens, "float32"),
      bs(f.model, f.modules, n, same, max_tokens), bm(f.merged, "", n, base, max_tokens);
  // The three batched setups alternate for several rounds and the medians are compared, so drift of a
  // shared machine during the measurement does not land in the ratios.
  std::vector<double> dr, d32r, sr, mr;
  for (int round = 0; round < (s.quick ? 1 : 7); ++round)
    dr.push_back(bd.run()), d32r.push_back(bd32.run()), sr.push_back(bs.run()), mr.push_back(bm.run());
  const double d = median(dr), d32 = median(d32r), sm = median(sr), m = median(mr);
  const double one = Bench(f.model, f.modules, 1, distinct, max_tokens).run();
  char note[128];
  const std::string what = std::to_string(n) + " concurrent requests, llama-small, LoRA r=16 all-linear";
  std::snprintf(note, sizeof(note), "%.3fx same-LoRA (target >= 0.8x); %.2fx one-at-a-time", d / sm, d / one);
  r.add({"serving", what + ", each a different LoRA (float16 bank, the default)", d, "tokens/s", note});
  std::snprintf(note, sizeof(note), "%.3fx same-LoRA", d32 / sm);
  r.add({"serving", what + ", each a different LoRA (float32 bank, exact)", d32, "tokens/s", note});
  r.add({"serving", what + ", all the same LoRA", sm, "tokens/s", "baseline"});
  std::snprintf(note, sizeof(note), "%.3fx same-LoRA", m / sm);
  r.add({"serving", what + ", merged model (no LoRA)", m, "tokens/s", note});
  std::snprintf(note, sizeof(note), "%.3fx same-LoRA", one / sm);
  r.add({"serving", what + ", one request at a time (PEFT / llama.cpp style)", one, "tokens/s", note});
}

}  // namespace

MDL_BENCHMARK(serving, serving);

}  // namespace mdl::bench
