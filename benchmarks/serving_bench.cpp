// Serving issue benchmark: 32 concurrent generation requests on the small Llama through the Engine
// (continuous batching), each with a different LoRA r=16 on every projection, vs all with the same
// LoRA, vs the merged model, vs one request (one module) at a time as PEFT and llama.cpp serve them.
// Throughput in generated tokens per second, from one run.
#include <ATen/ATen.h>
#include <torch/utils.h>

#include <unistd.h>

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

/// Generated tokens per second for `requests` submitted at once, request i using modules[i].
double throughput(const std::string& model_dir, const std::string& modules_dir, int64_t max_batch,
                  const std::vector<std::string>& modules, int64_t max_tokens) {
  EngineOptions o;
  o.model_dir = model_dir;
  o.modules_dir = modules_dir;
  o.max_batch = max_batch;
  Engine engine(load_model(model_dir), Tokenizer::from_file(model_dir), o);
  auto run = [&] {
    std::vector<std::future<CompletionResult>> out;
    for (size_t i = 0; i < modules.size(); ++i) {
      CompletionRequest r;
      r.prompt.clear();
      for (int64_t t = 0; t < 16; ++t) r.prompt.push_back(3 + static_cast<int64_t>((i * 7 + t * 13) % 500));
      r.sampling.max_tokens = max_tokens;
      r.sampling.temperature = 0.0;
      r.sampling.stop_token_ids = {-1};  // no early stop: every request generates max_tokens
      r.modules = engine.resolve(modules[i]);
      out.push_back(engine.submit(std::move(r)));
    }
    int64_t tokens = 0;
    for (auto& f : out) tokens += static_cast<int64_t>(f.get().tokens.size());
    return tokens;
  };
  run();  // warm-up: modules loaded, allocator warm
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t tokens = run();
  return static_cast<double>(tokens) / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void serving(const Settings& s, Report& r) {
  const int64_t n = s.quick ? 4 : 32, max_tokens = s.quick ? 4 : 32;
  Fixture f(n);
  std::vector<std::string> distinct, same(static_cast<size_t>(n), "lora0"), base(static_cast<size_t>(n), "base");
  for (int64_t i = 0; i < n; ++i) distinct.push_back("lora" + std::to_string(i));
  const double d = throughput(f.model, f.modules, n, distinct, max_tokens);
  const double sm = throughput(f.model, f.modules, n, same, max_tokens);
  const double m = throughput(f.merged, "", n, base, max_tokens);
  const double one = throughput(f.model, f.modules, 1, distinct, max_tokens);
  char note[128];
  const std::string what = std::to_string(n) + " concurrent requests, llama-small, LoRA r=16 all-linear";
  std::snprintf(note, sizeof(note), "%.3fx same-LoRA (target >= 0.8x); %.2fx one-at-a-time", d / sm, d / one);
  r.add({"serving", what + ", each a different LoRA", d, "tokens/s", note});
  r.add({"serving", what + ", all the same LoRA", sm, "tokens/s", "baseline"});
  std::snprintf(note, sizeof(note), "%.3fx same-LoRA", m / sm);
  r.add({"serving", what + ", merged model (no LoRA)", m, "tokens/s", note});
  std::snprintf(note, sizeof(note), "%.3fx same-LoRA", one / sm);
  r.add({"serving", what + ", one request at a time (PEFT / llama.cpp style)", one, "tokens/s", note});
}

}  // namespace

MDL_BENCHMARK(serving, serving);

}  // namespace mdl::bench
