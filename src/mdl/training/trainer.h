// The training loop for modules on a frozen backbone: AdamW over the trainable parameters only (no
// optimiser state for frozen weights), a learning-rate schedule, gradient clipping and accumulation,
// routing auxiliary losses added with a weight, evaluation, metrics as JSONL, and checkpoints from which a
// run resumes exactly: the modules, the optimiser's moments and step counts, the step (which fixes the
// data position, since example order is a function of seed and step) and the RNG (re-seeded per step).
// Multi-task data (examples with a `task`): tasks are sampled proportionally, temperature-scaled or
// uniformly, and each batch carries its task ids in the routing context (task-level routers, Polytropon).
// Losses: sequence classification heads use the example's label; causal LM heads predict the next token
// where targets are set (instruction: the completion; text: everything); token classification heads
// use the per-token targets.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "mdl/training/batch.h"
#include "mdl/training/dataset.h"
#include "mdl/training/evaluation.h"
#include "mdl/training/metrics.h"
#include "mdl/training/schedule.h"

namespace mdl {

template <class T>
class FieldList;

class ModuleSet;
class ModelImpl;
class ProcessGroup;

/// Training settings.
struct TrainOptions {
  ScheduleOptions schedule;       ///< learning rate over steps
  int64_t steps = 100;            ///< optimiser steps
  int64_t batch_size = 8;         ///< examples per micro-batch
  int64_t grad_accumulation = 1;  ///< micro-batches per optimiser step
  double weight_decay = 0.0;      ///< AdamW decoupled weight decay
  double clip_grad_norm = 1.0;    ///< max global gradient norm; 0 = off
  double aux_loss_weight = 1.0;   ///< weight of the routers' auxiliary losses (their own coefficients inside)
  int64_t eval_every = 0;         ///< evaluate every N steps (0: at the end only)
  int64_t checkpoint_every = 0;   ///< write a checkpoint every N steps (0: at the end only)
  uint64_t seed = 0;              ///< data order and per-step RNG
  std::string out_dir;            ///< metrics.jsonl and checkpoint/ go here; empty: nothing written
  /// the backbone's own parameters train too (full fine-tuning, training from scratch)
  bool train_base = false;
  /// with train_base, on a ModuleFormer grown by `mdl experts add`: only the new experts and their router
  /// rows train; every other weight (the old experts, their routing, attention, norms) stays as it was
  bool freeze_old_experts = false;
  int64_t early_stopping_patience = 0;  ///< stop after this many evaluations without improvement (0: never)
  std::string task_sampling = "proportional";  ///< multi-task data: proportional | temperature | uniform
  double sampling_temperature = 2.0;           ///< for temperature sampling
  ExampleRouting routing;                      ///< fixed per-example module choice by task or language
  std::string precision = "fp32";              ///< fp32 | bf16 (autocast: matmuls in bfloat16) | fp16 (CUDA)
  bool gradient_checkpointing = false;         ///< rerun layers in backward instead of keeping activations
};
void to_json(nlohmann::json& j, const TrainOptions& o);
void from_json(const nlohmann::json& j, TrainOptions& o);
/// The fields of TrainOptions: JSON keys, defaults and meanings (core/fields.h).
const FieldList<TrainOptions>& train_options_fields();
/// Throws naming the field when an option is out of its range (its field list and Trainer run it).
void validate(const TrainOptions& o);

/// The complete checkpoint at `dir`: `dir` itself, or `dir`.old when a run was killed between the two
/// renames that swap a new checkpoint in; empty when neither holds one.
std::string find_checkpoint(const std::string& dir);

/// Trains `trainable` modules of `set` (everything else frozen).
class Trainer {
 public:
  Trainer(ModuleSet& set, std::vector<std::string> trainable, TrainOptions options);
  ~Trainer();
  /// Trains from the current step to options.steps; returns the metrics of every step and calls
  /// `on_step` (if set) after each, for progress display.
  std::vector<TrainMetrics> train(const Dataset& data, const Dataset* eval = nullptr,
                                  const std::function<void(const TrainMetrics&)>& on_step = {});
  /// evaluate() of the model being trained, at the training batch size and with its routing.
  double evaluate(const Dataset& data);
  EvalMetrics evaluate_metrics(const Dataset& data);
  /// Writes a checkpoint directory (atomically: written beside, then renamed over `dir`).
  void save_checkpoint(const std::string& dir) const;
  /// Restores modules, optimiser state and step from a checkpoint written by save_checkpoint.
  void load_checkpoint(const std::string& dir);
  int64_t step() const { return step_; }
  /// Data-parallel training over `group`: batch_size is the global batch, split evenly over the ranks;
  /// each rank runs its share, the trainable parameters' gradients (and the loss) are averaged across
  /// ranks in buckets before clipping, and only rank 0 writes metrics, checkpoints and plots. The
  /// parameters start from rank 0's values.
  void set_process_group(ProcessGroup* group);
  /// Bytes of gradients this rank sent in the last step's all-reduce (0 without a group).
  int64_t bytes_communicated() const { return bytes_communicated_; }
  /// The best evaluation so far (accuracy: highest, perplexity: lowest); NaN before any.
  double best_eval() const { return best_; }

 private:
  /// Refuses, before any step, data with more tasks than a task-routed module knows (naming the option).
  void check_task_counts(const Dataset& data) const;
  struct State;
  double train_step(const Dataset& data, std::map<std::string, double>& routing);
  ModuleSet& set_;
  std::vector<std::string> trainable_;
  TrainOptions options_;
  int64_t step_ = 0;
  double best_ = std::numeric_limits<double>::quiet_NaN();
  int64_t evals_since_best_ = 0;
  std::unique_ptr<State> state_;
  ProcessGroup* group_ = nullptr;
  int64_t bytes_communicated_ = 0;
  bool writer() const;
  /// Records an evaluation; writes <out_dir>/best when it improved; true when training should stop.
  bool after_eval(double value);
};

}  // namespace mdl
