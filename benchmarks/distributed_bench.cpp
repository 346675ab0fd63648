// Distributed issue benchmark: LoRA r=16 training steps per second on the small Llama with 1 vs 2
// data-parallel processes (`mdl train --nproc N`, the same global batch, c10d/Gloo on loopback), and the
// bytes each rank all-reduces per step: the module's gradients, vs what full fine-tuning would send.
#include <ATen/ATen.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "harness.h"
#include "mdl/backbones/init_model.h"
#include "mdl/io/atomic_file.h"
#include "mdl/modules/module_set.h"

namespace mdl::bench {
namespace {

namespace fs = std::filesystem;

void distributed(const Settings& s, Report& r) {
  const fs::path root = fs::temp_directory_path() / ("mdl-dist-bench-" + std::to_string(::getpid()));
  const std::string mdl = (fs::read_symlink("/proc/self/exe").parent_path() / "mdl").string();
  if (!fs::exists(mdl)) {
    r.add({"distributed", "skipped: the mdl binary is not beside mdl_bench", 0, "", ""});
    return;
  }
  InitModelOptions o;
  o.arch = "llama";
  o.preset = s.quick ? "tiny" : "small";
  o.head = "sequence_classification";
  init_model(o, (root / "model").string());
  std::string lines;
  for (int i = 0; i < 256; ++i)
    lines += nlohmann::json({{"text", "example number " + std::to_string(i) + " of the benchmark data"},
                             {"label", i % 2}})
                 .dump() +
             "\n";
  io::write_text_atomic((root / "data.jsonl").string(), lines);
  const int64_t steps = s.quick ? 3 : 30;
  auto seconds = [&](int nproc) {
    nlohmann::json c = {{"model", (root / "model").string()},
                        {"modules",
                         {{"lora",
                           {{"type", "lora"},
                            {"options", {{"r", 16}, {"lora_alpha", 32}}},
                            {"targets", {{"target_modules", "all-linear"}}}}}}},
                        {"train_data", (root / "data.jsonl").string()},
                        {"options",
                         {{"steps", steps},
                          {"batch_size", 16},
                          {"out_dir", (root / ("run" + std::to_string(nproc))).string()},
                          {"schedule", {{"lr", 1e-3}}}}},
                        {"resume", false}};
    const std::string config = (root / ("run" + std::to_string(nproc) + ".json")).string();
    io::write_text_atomic(config, c.dump());
    const auto t0 = std::chrono::steady_clock::now();
    const int status = std::system(
        (mdl + " train --nproc " + std::to_string(nproc) + " --config " + config + " > /dev/null").c_str());
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    return status == 0 ? t : -1.0;
  };
  const double one = seconds(1), two = seconds(2);
  // What an all-reduce carries: the trainable gradients (LoRA) vs every parameter (full fine-tuning).
  ModuleSet set(load_model((root / "model").string()));
  ModuleConfig lora;
  lora.lora.r = 16;
  lora.targets.target_modules = {"all-linear"};
  set.add("lora", lora);
  double module_bytes = 0;
  for (const auto& [k, t] : set.tensors("lora")) module_bytes += static_cast<double>(t.numel()) * 4;
  const double full_bytes = static_cast<double>(set.model()->num_parameters()) * 4;
  std::error_code ec;
  fs::remove_all(root, ec);
  const std::string what =
      std::string("llama-") + o.preset + " LoRA r=16, global batch 16, " + std::to_string(steps) + " steps";
  char note[96];
  std::snprintf(note, sizeof(note), "%.3fx one process (2 cores shared by both ranks)", one / two);
  r.add({"distributed", what + ", 2 processes (Gloo)", steps / two, "steps/s",
         one > 0 && two > 0 ? note : "a run failed"});
  r.add({"distributed", what + ", 1 process", steps / one, "steps/s",
         "baseline (process start and load included)"});
  std::snprintf(note, sizeof(note), "%.4fx full fine-tuning's %.1f MiB", module_bytes / full_bytes,
                full_bytes / (1 << 20));
  r.add({"distributed", "bytes all-reduced per rank and step, LoRA gradients", module_bytes / (1 << 20),
         "MiB", note});
}

}  // namespace

MDL_BENCHMARK(distributed, distributed);

}  // namespace mdl::bench
