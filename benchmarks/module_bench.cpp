// Modules issue benchmarks, on the small preset with LoRA r=16 on every attention and MLP projection:
// forward unmerged vs merged (batch 1 and 32), and a LoRA training step vs a full fine-tuning step (time,
// and peak memory measured in separate child processes).
#include <ATen/ATen.h>
#include <torch/optim/adamw.h>
#include <torch/utils.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "harness.h"
#include "mdl/backbones/init_model.h"
#include "mdl/modules/module_set.h"

namespace mdl::bench {
namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

Model small_model(const std::string& arch) {
  Model m = create_model(preset_config(arch, "small", 8192, HeadKind::causal_lm, 2));
  m->init_weights(0);
  return m;
}

ModuleConfig lora16() {
  ModuleConfig c;
  c.lora.r = 16;
  c.lora.alpha = 32;
  c.lora.init = "random";  // non-zero B: the real cost of an unmerged, trained LoRA
  c.targets.target_modules = {"all-linear"};
  return c;
}

void lora_forward(const Settings& s, Report& r) {
  torch::NoGradGuard no_grad;
  for (const std::string arch : {"llama", "gpt2"}) {
    ModuleSet set(small_model(arch));
    set.model()->eval();
    set.add("lora", lora16());
    for (int64_t batch : {1, 32}) {
      const int64_t T = s.quick ? 32 : 128;
      ModelInput in;
      in.input_ids = at::randint(0, 8192, {batch, T}, at::kLong);
      // Alternate the two paths for several rounds and compare medians, so drift of a shared machine
      // during the measurement does not land in the ratio.
      std::vector<double> unmerged_runs, merged_runs;
      Settings round = s;
      round.min_seconds = s.min_seconds / 2;
      for (int r = 0; r < (s.quick ? 1 : 5); ++r) {
        unmerged_runs.push_back(time_it([&] { set.model()->forward(in); }, round));
        set.merge("lora");
        merged_runs.push_back(time_it([&] { set.model()->forward(in); }, round));
        set.unmerge("lora");
      }
      const double unmerged = median(unmerged_runs), merged = median(merged_runs);
      const std::string what = arch + "-small batch " + std::to_string(batch) + " x " + std::to_string(T);
      char note[96];
      std::snprintf(note, sizeof(note), "%.3fx merged time%s", unmerged / merged,
                    batch == 32 ? " (target <= 1.15x)" : "");
      r.add({"lora", "forward unmerged r=16 all-linear, " + what, batch * T / unmerged, "tokens/s", note});
      r.add({"lora", "forward merged, " + what, batch * T / merged, "tokens/s", "baseline"});
    }
  }
}

// One AdamW step of causal-LM training on the small Llama, in a child process of its own (so that its peak
// memory is its own); `lora` trains only a LoRA r=16, `checkpointing` reruns each layer during backward
// instead of keeping its activations. Two warm-up steps (the optimiser's state, the allocator's cache),
// then at least 5 timed steps and 1.5 seconds.
Timing train_step(const Settings& s, bool lora, bool checkpointing) {
  Model model = small_model("llama");
  ModuleSet set(model);
  std::vector<at::Tensor> params;
  if (lora) {
    ModuleConfig c = lora16();
    c.lora.init = "kaiming";
    set.add("lora", c);
    set.freeze_base({"lora"});
    params = set.parameters({"lora"});
  } else {
    params = model->parameters();
  }
  model->train();
  model->set_gradient_checkpointing(checkpointing);
  const int64_t B = s.quick ? 2 : 8, T = s.quick ? 32 : 128;
  at::Tensor ids = at::randint(0, 8192, {B, T + 1}, at::kLong);
  ModelInput in;
  in.input_ids = ids.narrow(1, 0, T);
  at::Tensor targets = ids.narrow(1, 1, T);  // (B, T): position t predicts token t + 1
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(1e-4));
  mark_baseline();
  Settings timed = s;
  timed.min_seconds = s.quick ? s.min_seconds : std::max(s.min_seconds, 1.5);
  return time_runs(
      [&] {
        opt.zero_grad();
        model->lm_loss(in, targets).backward();  // as the trainer computes it
        opt.step();
      },
      timed, /*warmup=*/s.quick ? 1 : 2, /*min_runs=*/s.quick ? 3 : 5);
}

// Children alternate full fine-tuning and LoRA for several rounds; each round's ratio compares the two
// children's fastest steps, and the reported ratio is the median over rounds. On a shared machine other
// work only ever adds time to a step, in phases of seconds to minutes, and unevenly: a full step reads and
// writes 2.5x more memory (gradients and AdamW state of every weight) and slows more under contention
// (measured here: full steps 0.57-1.3 s within one run, LoRA 0.43-0.62). The fastest step is the cost of
// the work itself, and the two children of a round run within seconds of each other, in the same phase.
// The ratio of median steps is reported beside it.
void train_compare(const Settings& s, Report& r) {
  const int64_t tokens = s.quick ? 64 : 1024;
  const double mb = 1024.0 * 1024.0;
  char note[160];
  for (bool checkpointing : {false, true}) {
    const std::string suffix = checkpointing ? "_ckpt" : "";
    std::vector<double> full_fastest, lora_fastest, ratios, full_median, lora_median;
    ChildResult full, lora;
    for (int round = 0; round < (s.quick ? 1 : 6); ++round) {
      full = run_child("step_full" + suffix, s), lora = run_child("step_lora" + suffix, s);
      full_fastest.push_back(full.fastest), lora_fastest.push_back(lora.fastest);
      ratios.push_back(lora.fastest / full.fastest);
      full_median.push_back(full.seconds), lora_median.push_back(lora.seconds);
    }
    const double ff = median(full_fastest), lf = median(lora_fastest);
    const std::string how = checkpointing ? ", gradient checkpointing" : "";
    std::snprintf(note, sizeof(note), "%.3fx full fine-tuning time%s; rounds %.3f-%.3f; median steps %.3fx",
                  median(ratios), checkpointing ? "" : " (target <= 0.75x)",
                  *std::min_element(ratios.begin(), ratios.end()),
                  *std::max_element(ratios.begin(), ratios.end()), median(lora_median) / median(full_median));
    r.add({"lora", "train step llama-small, LoRA r=16 all-linear" + how, tokens / lf, "tokens/s", note});
    r.add({"lora", "train step llama-small, full fine-tuning" + how, tokens / ff, "tokens/s",
           "baseline (fastest step)"});
    // Tensor memory is what the step needs (torch's max_memory_allocated): weights, gradients, optimiser
    // state, activations. The process's peak adds libtorch's ~180 MB and the allocator's cache. The
    // targets are for one configuration, the plain step: time and memory measured on the same children.
    std::snprintf(note, sizeof(note), "%.3fx full fine-tuning%s", double(lora.peak_tensor) / full.peak_tensor,
                  checkpointing ? "" : " (target <= 0.5x)");
    r.add({"lora", "train peak tensor memory, LoRA" + how, lora.peak_tensor / mb, "MiB", note});
    r.add({"lora", "train peak tensor memory, full fine-tuning" + how, full.peak_tensor / mb, "MiB",
           "baseline"});
    std::snprintf(note, sizeof(note), "%.3fx full fine-tuning", double(lora.peak_rss) / full.peak_rss);
    r.add({"lora", "train peak memory (process), LoRA" + how, lora.peak_rss / mb, "MiB", note});
    r.add({"lora", "train peak memory (process), full fine-tuning" + how, full.peak_rss / mb, "MiB",
           "baseline"});
  }
}

}  // namespace

MDL_BENCHMARK(lora_forward, lora_forward);
MDL_BENCHMARK(lora_train, train_compare);
MDL_BENCHMARK_CHILD(step_full, [](const Settings& s) { return train_step(s, false, false); });
MDL_BENCHMARK_CHILD(step_lora, [](const Settings& s) { return train_step(s, true, false); });
MDL_BENCHMARK_CHILD(step_full_ckpt, [](const Settings& s) { return train_step(s, false, true); });
MDL_BENCHMARK_CHILD(step_lora_ckpt, [](const Settings& s) { return train_step(s, true, true); });

}  // namespace mdl::bench
