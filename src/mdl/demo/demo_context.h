// What the demo's experiments share (internal to src/mdl/demo): run sizes, the progress bar, the
// results being collected, and small helpers to train, predict and record.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <chrono>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "mdl/backbones/model.h"
#include "mdl/demo/demo.h"
#include "mdl/demo/demo_data.h"
#include "mdl/report/plot.h"
#include "mdl/training/trainer.h"

namespace mdl {
class ModuleSet;
}

namespace mdl::demo {

/// Model and data sizes of a run (tiny / standard / full).
struct Sizes {
  // vision
  int64_t vit_hidden = 64, vit_layers = 4, vit_heads = 4, vit_intermediate = 128, vit_patch = 7;
  int64_t pretrain_examples = 60000, pretrain_steps = 1500, batch = 64, test_examples = 2000;
  int64_t transfer_train = 8000, transfer_steps = 600;
  int64_t task_train = 4000, task_steps = 100;  ///< per continual / merging task
  int64_t poly_steps = 300;
  // text
  int64_t lm_hidden = 128, lm_layers = 4, lm_heads = 4, lm_intermediate = 256, vocab = 1024, seq_len = 48;
  int64_t lm_texts_per_language = 3000, lm_pretrain_steps = 600, lm_batch = 32;
  int64_t language_adapter_steps = 600, text_task_train = 3000, text_task_steps = 300, text_task_test = 400;
  // ModuleFormer (bytes of English, then German fortunes)
  int64_t mf_hidden = 64, mf_layers = 2, mf_heads = 2, mf_att_hidden = 32, mf_ffd_hidden = 64, mf_experts = 8;
  int64_t mf_seq_len = 64, mf_batch = 32, mf_train_chunks = 4000, mf_valid_chunks = 64;
  int64_t mf_steps = 150, mf_continual_steps = 100, mf_prune_steps = 100;
  int64_t mf_added_experts = 4, mf_keep_experts = 4;
  double mf_mi_weight = 0.1, mf_switch_weight = 0.1, mf_concentration_weight = 0.1;
  // Is a modular architecture enough? (rule MLPs)
  std::vector<int64_t> md_rules = {2, 4, 8};
  int64_t md_seeds = 2, md_steps = 2000, md_batch = 256, md_encoder = 32, md_dim = 128, md_eval_batches = 10;
  double md_lr = 1e-3;
  std::vector<std::string> md_sequence_tasks;  ///< --full: mha, rnn
  std::vector<int64_t> md_sequence_rules = {2, 4};
  // Is modularity transferable? (ViTs on Fashion-MNIST: teacher, matching and incompatible students)
  int64_t tr_hidden = 64, tr_layers = 4, tr_heads = 4, tr_intermediate = 128, tr_patch = 14, tr_batch = 32;
  int64_t tr_student_layers = 2, tr_narrow_hidden = 48, tr_narrow_intermediate = 96;
  int64_t tr_pretrain_examples = 12000, tr_pretrain_steps = 600, tr_task_train = 8000, tr_module_steps = 300;
  int64_t tr_distill_steps = 300, tr_seeds = 3, tr_align_examples = 512, tr_test_examples = 1000;
  std::vector<int64_t> tr_eval_steps = {0, 25, 100, 300};  ///< test accuracy at these steps of each arm
  double tr_lr = 1e-3;
  // ... and the polyglot decoder's language adapters on a half-depth student
  int64_t tt_teacher_adapter_steps = 200, tt_distill_steps = 100, tt_adapter_steps = 60;
  // S2RMs (bouncing balls on a ring, seen through crops): S2RMs, RIMs and a GRU
  int64_t s2_cells = 16, s2_modules = 8, s2_hidden = 32, s2_steps = 800, s2_batch = 32, s2_episode_steps = 10;
  int64_t s2_test_episodes = 128;
  double s2_lr = 5e-3;
};
Sizes sizes_for(DemoSize size);
const char* size_name(DemoSize size);

/// A progress bar over the run's planned training steps (a line per stage when stderr is not a terminal).
class Progress {
 public:
  /// `report`: a file this bar writes its state to; `peer`: a file another process's bar writes, added in.
  Progress(int64_t total_steps, bool enabled, std::string report = "", std::string peer = "");
  /// A new stage of `steps` steps.
  void stage(const std::string& name, int64_t steps);
  /// Steps found to be needed after the start (a backbone missing from the cache).
  void add(int64_t steps) { total_ += steps; }
  void step();
  /// Keeps drawing (the other process's progress) until `done` returns true.
  void wait(const std::function<bool()>& done);
  void finish();

 private:
  void draw(bool force);
  int64_t total_, done_ = 0, stage_steps_ = 0, stage_done_ = 0;
  std::string stage_, report_, peer_;
  bool enabled_, tty_;
  int last_percent_ = -1;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

/// One expected direction the report checks and states, holding or not.
struct Check {
  std::string claim;
  bool holds = false;
  std::string detail;
};

/// The run's shared state.
struct Context {
  DemoOptions options;
  Sizes sizes;
  c10::Device device = c10::Device(c10::kCPU);
  std::string cache_dir, figures_dir, modules_dir, models_dir;
  Progress* progress = nullptr;
  nlohmann::json results = nlohmann::json::object();
  std::vector<Check> checks;

  /// Records a figure file (relative to out_dir) with its caption, for the report.
  void figure(const std::string& section, const std::string& file, const std::string& caption);
  void check(const std::string& claim, bool holds, const std::string& detail);
};

/// Training settings for the demo: AdamW, warm-up then cosine decay, the run's seed.
TrainOptions train_options(const Context& ctx, int64_t steps, double lr, int64_t batch,
                           bool train_base = false);
/// Trains `trainable` modules of `set` (or the whole model with train_base), showing progress under
/// `stage`; returns each step's metrics.
std::vector<TrainMetrics> train(Context& ctx, ModuleSet& set, const std::vector<std::string>& trainable,
                                const TrainOptions& options, const Dataset& data, const std::string& stage);
/// The fortunes of `language` (one of fortune_packages()): the run's files for it, or those its Debian
/// package installed; throws when there are fewer than 8.
std::vector<std::string> fortunes_of(const Context& ctx, const std::string& language);
/// Accuracy of logits (N, L) against `labels` (N); with `classes`, the argmax is taken over those
/// columns only (a decision between the task's classes).
double accuracy(const at::Tensor& logits, const at::Tensor& labels, const std::vector<int64_t>& classes = {});
/// The labels (N) of a dataset's examples.
at::Tensor labels_of(const Dataset& data);
/// `v` printed with a printf `format` (for the checks' details).
std::string number(double v, const char* format = "%.3f");
/// A ViT for 28x28 grey images and Fashion-MNIST's ten classes (pre-LN blocks, GELU, biases everywhere).
ModelConfig fashion_vit_config(int64_t hidden, int64_t layers, int64_t heads, int64_t intermediate,
                               int64_t patch);
/// Seconds since `start`.
double seconds_since(std::chrono::steady_clock::time_point start);
/// Training losses by step, for a loss curve.
std::vector<double> losses(const std::vector<TrainMetrics>& history);
/// A curve of `y` over steps 1..n.
Series step_series(const std::string& name, const std::vector<double>& y);
/// Writes model `dir` atomically: built by `make` in a temporary directory beside it, then renamed.
void write_dir_atomic(const std::string& dir, const std::function<void(const std::string& tmp)>& make);

// The experiments (vision_experiments.cpp, language_experiments.cpp) and the report (demo_report.cpp).
void run_vision(Context& ctx);
void run_language(Context& ctx);
void run_moduleformer(Context& ctx);
void run_modularity(Context& ctx);
/// Experiment 11: S2RMs against a monolithic GRU and RIMs on bouncing balls (s2rm_experiments.cpp).
void run_s2rm(Context& ctx);
/// Experiment 10: its image study (teacher and students of ViTs) and its text study (the polyglot decoder's
/// language adapters); `--part transfer` runs both, transfer-vision and transfer-text one each.
void run_transfer(Context& ctx, bool vision, bool text);
void write_report(const DemoOptions& options, const nlohmann::json& results);
/// The cached ViT's directory (keyed by its config and training settings); a cached backbone is complete
/// when its directory holds `pretrain.json`.
std::string vit_cache_path(const Context& ctx);
bool cache_complete(const std::string& dir);
/// A cache key as 16 hex digits.
std::string hex64(uint64_t h);
/// Steps the experiments will train, for the progress bar; the language part adds its pretraining steps
/// itself when its cached decoder is missing (its key hashes the text, read only then).
int64_t planned_vision_steps(const Sizes& s, bool backbone_cached);
int64_t planned_language_steps(const Sizes& s);
int64_t planned_moduleformer_steps(const Sizes& s);
int64_t planned_modularity_steps(const Sizes& s);
int64_t planned_s2rm_steps(const Sizes& s);
/// Experiment 10's steps, and those of its backbones when they are not cached (added when found missing).
int64_t planned_transfer_steps(const Sizes& s, bool vision, bool text);
int64_t planned_transfer_backbone_steps(const Sizes& s);

}  // namespace mdl::demo
