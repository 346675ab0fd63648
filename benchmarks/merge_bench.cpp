// Aggregation issue benchmark: `mdl merge` (TIES against a base, streamed) of three small-preset
// checkpoints in a child process: wall time, and peak resident memory above the process's baseline
// against one checkpoint's size (target <= 1.5x), with loading all inputs at once for comparison.
// MDL_BENCH_MERGE_METHOD=linear|dare_ties|... measures another method.
#include <ATen/ATen.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "harness.h"
#include "mdl/aggregation/merge.h"
#include "mdl/backbones/init_model.h"
#include "mdl/io/safetensors.h"

namespace mdl::bench {
namespace {
namespace fs = std::filesystem;

std::string root() {
  const char* dir = std::getenv("MDL_BENCH_MERGE_DIR");
  return dir ? dir : "";
}

std::vector<std::string> inputs() {
  return {root() + "/m1", root() + "/m2", root() + "/m3"};
}

double streamed(const Settings&) {
  MergeOptions o;
  o.method = std::getenv("MDL_BENCH_MERGE_METHOD") ? std::getenv("MDL_BENCH_MERGE_METHOD") : "ties";
  o.density = 0.5;
  mark_baseline();
  const auto t0 = std::chrono::steady_clock::now();
  merge_checkpoints(inputs(), root() + "/base", o, root() + "/out");
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// What a naive merger does: every input loaded into memory (copies), then merged.
double all_in_memory(const Settings&) {
  mark_baseline();
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::map<std::string, at::Tensor>> all;
  for (const auto& dir : inputs()) {
    auto m = io::load_safetensors(dir + "/model.safetensors");
    for (auto& [k, t] : m) t = t.clone();
    all.push_back(std::move(m));
  }
  auto base = io::load_safetensors(root() + "/base/model.safetensors");
  MergeOptions o;
  o.method = "ties";
  o.density = 0.5;
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, t] : all[0])
    out[name] = merge_tensors({all[0].at(name), all[1].at(name), all[2].at(name)}, base.at(name), o, name);
  io::save_safetensors(root() + "/out2.safetensors", out);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void merge_bench(const Settings& s, Report& r) {
  char tmpl[] = "/tmp/mdl-merge-bench-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  setenv("MDL_BENCH_MERGE_DIR", dir.c_str(), 1);
  const std::string preset = s.quick ? "tiny" : "small";
  int seed = 1;
  for (const char* name : {"base", "m1", "m2", "m3"}) {
    InitModelOptions o;
    o.arch = "llama";
    o.preset = preset;
    o.seed = static_cast<uint64_t>(seed++);
    init_model(o, dir + "/" + name);
  }
  const double size = static_cast<double>(fs::file_size(dir + "/m1/model.safetensors"));
  ChildResult stream = run_child("merge_streamed", s), naive = run_child("merge_all_in_memory", s);
  const double mb = 1024.0 * 1024.0;
  char note[128];
  const std::string what =
      "3 x llama-" + preset + " (" + std::to_string(static_cast<int>(size / mb)) + " MiB each), ties";
  r.add({"merge", "mdl merge streamed, " + what, stream.seconds, "s", "wall time"});
  const double extra = static_cast<double>(stream.peak_rss - stream.baseline_rss);
  std::snprintf(note, sizeof(note), "%.2fx one checkpoint (target <= 1.5x)", extra / size);
  r.add({"merge", "peak memory above baseline, streamed", extra / mb, "MiB", note});
  const double naive_extra = static_cast<double>(naive.peak_rss - naive.baseline_rss);
  std::snprintf(note, sizeof(note), "%.2fx one checkpoint", naive_extra / size);
  r.add({"merge", "peak memory above baseline, all inputs in memory", naive_extra / mb, "MiB", note});
  fs::remove_all(dir);
}

}  // namespace

MDL_BENCHMARK(merge, merge_bench);
MDL_BENCHMARK_CHILD(merge_streamed, streamed);
MDL_BENCHMARK_CHILD(merge_all_in_memory, all_in_memory);

}  // namespace mdl::bench
