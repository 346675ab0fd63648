#include "mdl/training/trainer.h"

#include <ATen/ATen.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>
#include <torch/utils.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>

#include "mdl/backbones/moduleformer_experts.h"
#include "mdl/core/autocast.h"
#include "mdl/core/error.h"
#include "mdl/core/fields.h"
#include "mdl/distributed/process_group.h"
#include "mdl/io/atomic_file.h"
#include "mdl/modules/module_set.h"
#include "mdl/modules/module_type.h"
#include "mdl/routing/routing_context.h"
#include "mdl/routing/routing_log.h"
#include "mdl/training/trainer_state.h"

namespace mdl {
namespace fs = std::filesystem;

const FieldList<TrainOptions>& train_options_fields() {
  using O = TrainOptions;
  static const FieldList<O> f =
      FieldList<O>("options")
          .add("steps", &O::steps, "optimiser steps")
          .add("batch_size", &O::batch_size, "examples per micro-batch")
          .add("grad_accumulation", &O::grad_accumulation, "micro-batches per optimiser step")
          .add("weight_decay", &O::weight_decay, "AdamW decoupled weight decay")
          .add("clip_grad_norm", &O::clip_grad_norm, "maximum global gradient norm (0: no clipping)")
          .add("aux_loss_weight", &O::aux_loss_weight,
               "weight of the routers' auxiliary losses (load balancing, z-loss)")
          .add("eval_every", &O::eval_every, "evaluate every N steps (0: at the end only)")
          .add("checkpoint_every", &O::checkpoint_every,
               "write a checkpoint every N steps (0: at the end only)")
          .add("seed", &O::seed, "data order and per-step randomness")
          .add("out_dir", &O::out_dir, "metrics.jsonl, checkpoint/ and the trained modules go here")
          .add("train_base", &O::train_base,
               "train the backbone's own parameters too (full fine-tuning, training from scratch)")
          .add("freeze_old_experts", &O::freeze_old_experts,
               "with train_base on a ModuleFormer grown by mdl experts add: train only the new experts and "
               "their router rows")
          .add("early_stopping_patience", &O::early_stopping_patience,
               "stop after this many evaluations without improvement (0: never)")
          .add("task_sampling", &O::task_sampling, "multi-task data: proportional | temperature | uniform")
          .add("sampling_temperature", &O::sampling_temperature,
               "temperature sampling: n_i^(1/T), normalised")
          .add("routing", &O::routing, example_routing_fields(),
               "fixed per-example module choice by task or language")
          .add("precision", &O::precision,
               "fp32 | bf16 (autocast: matrix products in bfloat16, weights in float32) | fp16 (CUDA)")
          .add("gradient_checkpointing", &O::gradient_checkpointing,
               "rerun each layer during backward instead of keeping its activations (less memory, ~1/3 more "
               "compute)")
          .add("schedule", &O::schedule, schedule_fields(), "learning rate over steps")
          .check([](const O& o) { validate(o); });
  return f;
}

void to_json(nlohmann::json& j, const TrainOptions& o) {
  j = train_options_fields().write(o);
}

void from_json(const nlohmann::json& j, TrainOptions& o) {
  o = train_options_fields().read(j);
}

void validate(const TrainOptions& o) {
  validate(o.schedule);
  autocast_dtype(o.precision);                                                // validates
  task_sampling_probabilities({1}, o.task_sampling, o.sampling_temperature);  // validates
  MDL_CHECK(
      !o.freeze_old_experts || o.train_base,
      "[train] options.freeze_old_experts trains the new experts of the backbone: set options.train_base "
      "too");
  MDL_CHECK(o.steps > 0 && o.batch_size > 0 && o.grad_accumulation > 0,
            "[train] steps, batch_size and "
            "grad_accumulation must be > 0, got ",
            o.steps, ", ", o.batch_size, ", ", o.grad_accumulation);
  // A batch is built whole in memory: past these, a run would exhaust it before its first step.
  MDL_CHECK(o.batch_size <= 65536 && o.grad_accumulation <= 65536, "[train] options.batch_size ",
            o.batch_size, " and options.grad_accumulation ", o.grad_accumulation,
            " must be at most 65536 (examples held in memory "
            "at once); a larger batch is batch_size x grad_accumulation");
}

Trainer::Trainer(ModuleSet& set, std::vector<std::string> trainable, TrainOptions options)
    : set_(set),
      trainable_(std::move(trainable)),
      options_(std::move(options)),
      state_(std::make_unique<State>()) {
  validate(options_);
  MDL_CHECK(!trainable_.empty() || options_.train_base,
            "[train] name the modules to train, or set train_base");
  if (trainable_.empty()) {  // the backbone alone: every module frozen
    set_.freeze_base({});
    for (auto& t : set_.parameters()) t.set_requires_grad(false);
  } else {
    set_.freeze_base(trainable_);
  }
  for (const auto& name : trainable_)
    for (const auto& [k, t] : set_.tensors(name))
      if (t.requires_grad()) state_->keys.push_back(name + "/" + k), state_->params.push_back(t);
  if (options_.train_base && options_.freeze_old_experts) {
    for (auto& p : set_.model()->parameters()) p.set_requires_grad(false);
    std::map<const void*, std::string> names;
    for (auto& p : set_.model()->named_parameters()) names[p.value().unsafeGetTensorImpl()] = p.key();
    for (auto& slice : new_expert_slices(*set_.model())) {
      at::Tensor p = slice.param;
      p.set_requires_grad(true);
      state_->keys.push_back("base/" + names[p.unsafeGetTensorImpl()]), state_->params.push_back(p);
      state_->frozen.push_back({p, p.narrow(0, 0, slice.frozen).detach().clone()});
    }
  } else if (options_.train_base) {
    for (auto& p : set_.model()->named_parameters()) {
      p.value().set_requires_grad(true);
      state_->keys.push_back("base/" + p.key()), state_->params.push_back(p.value());
    }
  }
  MDL_CHECK(!state_->params.empty(), "[train] the modules have no trainable parameters");
  torch::optim::AdamWOptions o(options_.schedule.lr);
  o.weight_decay(options_.weight_decay);
  state_->optimizer = std::make_unique<torch::optim::AdamW>(state_->params, o);
}

Trainer::~Trainer() = default;

namespace {

std::map<std::string, double> routing_summary(const RoutingLog& log) {
  if (log.stats().empty()) return {};
  double entropy = 0, dropped = 0, max_load = 0;
  for (const auto& st : log.stats()) {
    entropy += st.entropy, dropped += st.dropped_fraction;
    for (double l : st.load) max_load = std::max(max_load, l);
  }
  const auto n = static_cast<double>(log.stats().size());
  return {{"aux_loss", log.aux_loss().item<double>()},
          {"entropy", entropy / n},
          {"dropped_fraction", dropped / n},
          {"max_load", max_load}};
}

}  // namespace

void Trainer::check_task_counts(const Dataset& data) const {
  // Modules that route by task know a fixed number of tasks: a dataset with more would fail at the first
  // batch holding one of them; say so before step 1, naming the option.
  const int64_t tasks = static_cast<int64_t>(data.tasks.size());
  for (const auto& name : set_.names()) {
    const ModuleConfig& c = set_.config(name);
    const ModuleType& type = module_type(c.type);
    const int64_t known = type.tasks_known ? type.tasks_known(c) : -1;
    const std::string field = "options.num_tasks";
    if (known < 0 || tasks <= known) continue;
    std::string list;
    for (size_t t = 0; t < data.tasks.size() && t < 6; ++t) list += (t ? ", " : "") + data.tasks[t];
    MDL_FAIL("[train] module '", name, "' (", c.type, ") routes by task and knows ", known, " task(s) (its ",
             field, "), but the data has ", tasks, ": ", list, data.tasks.size() > 6 ? ", ..." : "", "; set ",
             field, " to at least ", tasks);
  }
}

double Trainer::train_step(const Dataset& data, std::map<std::string, double>& routing) {
  ModelImpl& model = *set_.model();
  const int64_t n = static_cast<int64_t>(data.examples.size());
  const int64_t pad = std::max<int64_t>(0, model.config().pad_token_id);
  at::manual_seed(
      static_cast<uint64_t>(options_.seed * 1000003u + static_cast<uint64_t>(step_)));  // dropout, sampling
  auto& opt = *state_->optimizer;
  const double lr = learning_rate(options_.schedule, step_);
  for (auto& g : opt.param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
  opt.zero_grad();
  // Checkpointing for this step only: the model is the caller's and keeps its own setting afterwards.
  struct CheckpointingScope {
    ModelImpl& model;
    bool before;
    ~CheckpointingScope() { model.set_gradient_checkpointing(before); }
  } scope{model, model.gradient_checkpointing()};
  model.set_gradient_checkpointing(options_.gradient_checkpointing || scope.before);
  double total = 0;
  const int64_t world = group_ ? group_->size() : 1, rank = group_ ? group_->rank() : 0;
  const int64_t local = options_.batch_size / world;  // this rank's share of the global batch
  for (int64_t m = 0; m < options_.grad_accumulation; ++m) {
    // The data position is a function of the step: a resumed run reads exactly what the original would,
    // whatever the number of ranks (rank r reads the r-th slice of the global batch).
    std::vector<int64_t> which;
    for (int64_t j = 0; j < local; ++j)
      which.push_back(
          state_->sample((step_ * options_.grad_accumulation + m) * options_.batch_size + rank * local + j, n,
                         options_.seed));
    Batch b = collate(data, which, pad, model.device(), options_.routing);
    ModelInput in = model_input(b);
    RoutingLog log;
    in.routing_log = &log;
    at::Tensor loss;
    {  // forward and loss under autocast; backward outside it, as torch.autocast prescribes
      AutocastGuard autocast(model.device(), autocast_dtype(options_.precision));
      loss = task_loss(model, in, b);
      // Separate statements: the routers fill the log during forward (operands of + are unsequenced).
      loss = loss + options_.aux_loss_weight * log.aux_loss().to(b.ids.device(), at::kFloat);
    }
    const double value = loss.item<double>();
    if (!std::isfinite(value)) {  // stop at once: the update would spread NaN into every weight it touches
      std::string lines;
      for (size_t i = 0; i < which.size() && i < 8; ++i) {
        const Example& e = data.examples[static_cast<size_t>(which[i])];
        lines += (i ? ", " : "") +
                 (e.line > 0 ? "line " + std::to_string(e.line) : "example " + std::to_string(which[i]));
      }
      MDL_FAIL("[train] step ", step_ + 1, ": the loss is ", value, " on a batch of ", which.size(),
               " examples (", lines, which.size() > 8 ? ", ..." : "",
               "); no update was made. Lower the learning rate (options.schedule.lr), "
               "check those records, or train in float32 (options.precision)");
    }
    (loss / static_cast<double>(options_.grad_accumulation)).backward();
    if (m + 1 == options_.grad_accumulation) routing = routing_summary(log);
    total += value / static_cast<double>(options_.grad_accumulation);
  }
  if (group_) {  // average the gradients (and the loss, for the log) over the ranks
    std::vector<at::Tensor> buffers;
    for (auto& p : state_->params) {
      if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
      buffers.push_back(p.grad());
    }
    at::Tensor loss =
        at::full({1}, total, state_->params[0].options().dtype(at::kDouble));  // NCCL wants device tensors
    buffers.push_back(loss);
    bytes_communicated_ = group_->all_reduce_mean(buffers) - static_cast<int64_t>(sizeof(double));
    total = loss.item<double>();
  }
  for (auto& f : state_->frozen)  // the old experts' rows get no gradient, nor a share of the clipping
    if (f.param.grad().defined()) f.param.mutable_grad().narrow(0, 0, f.rows.size(0)).zero_();
  if (options_.clip_grad_norm > 0) torch::nn::utils::clip_grad_norm_(state_->params, options_.clip_grad_norm);
  opt.step();
  if (!state_->frozen.empty()) {
    torch::NoGradGuard no_grad;
    for (auto& f : state_->frozen) f.param.narrow(0, 0, f.rows.size(0)).copy_(f.rows);
  }
  ++step_;
  return total;
}

void Trainer::set_process_group(ProcessGroup* group) {
  group_ = group;
  if (!group_) return;
  MDL_CHECK(options_.batch_size % group_->size() == 0, "[train] batch_size ", options_.batch_size,
            " (the global batch) must divide evenly over ", group_->size(), " ranks");
  torch::NoGradGuard no_grad;
  group_->broadcast(state_->params, 0);  // every rank starts from rank 0's parameters
}

bool Trainer::writer() const {
  return !group_ || group_->rank() == 0;
}

double Trainer::evaluate(const Dataset& data) {
  return evaluate_metrics(data).primary();
}

EvalMetrics Trainer::evaluate_metrics(const Dataset& data) {
  return mdl::evaluate_metrics(*set_.model(), data, options_.batch_size, options_.routing);
}

std::vector<TrainMetrics> Trainer::train(const Dataset& data, const Dataset* eval,
                                         const std::function<void(const TrainMetrics&)>& on_step) {
  check_labels(*set_.model(), data);
  if (eval) check_labels(*set_.model(), *eval);
  check_task_counts(data);
  if (eval) check_task_counts(*eval);
  std::vector<TrainMetrics> history;
  state_->by_task.clear();
  state_->task_cdf.clear();
  if (data.tasks.size() > 1) {
    state_->by_task.resize(data.tasks.size());
    for (size_t e = 0; e < data.examples.size(); ++e)
      state_->by_task[static_cast<size_t>(task_index(data, data.examples[e].task))].push_back(
          static_cast<int64_t>(e));
    std::vector<int64_t> sizes;
    for (const auto& pool : state_->by_task) sizes.push_back(static_cast<int64_t>(pool.size()));
    double sum = 0;
    for (double p : task_sampling_probabilities(sizes, options_.task_sampling, options_.sampling_temperature))
      state_->task_cdf.push_back(sum += p);
  }
  // A resumed run continues the metrics file: the lines up to the checkpoint's step are kept.
  std::vector<TrainMetrics> logged;
  std::string log_text;
  const fs::path metrics_file = fs::path(options_.out_dir) / "metrics.jsonl";
  if (!options_.out_dir.empty() && step_ > 0 && fs::exists(metrics_file)) {
    for (const auto& m : read_metrics(metrics_file.string()))
      if (m.step <= step_) logged.push_back(m), log_text += metrics_line(m);
  }
  set_.model()->train();
  while (step_ < options_.steps) {
    TrainMetrics m;
    m.lr = learning_rate(options_.schedule, step_);
    m.loss = train_step(data, m.routing);
    m.step = step_;
    const bool last = step_ == options_.steps;
    bool stop = false;
    if (eval && (last || (options_.eval_every > 0 && step_ % options_.eval_every == 0))) {
      const EvalMetrics em = evaluate_metrics(*eval);
      m.eval = em.primary();
      m.f1 = std::isnan(em.macro_f1) ? -1 : em.macro_f1;
      if (eval->tasks.size() > 1)
        m.eval_tasks = evaluate_per_task(*set_.model(), *eval, options_.batch_size, options_.routing);
      stop = after_eval(m.eval);
    }
    history.push_back(m);
    if (on_step) on_step(m);
    if (!options_.out_dir.empty() && writer()) {
      fs::create_directories(options_.out_dir);
      logged.push_back(m);
      log_text += metrics_line(m);
      io::write_text_atomic(metrics_file.string(), log_text);
      if (last || stop || (options_.checkpoint_every > 0 && step_ % options_.checkpoint_every == 0)) {
        save_checkpoint((fs::path(options_.out_dir) / "checkpoint").string());
        write_training_plots(options_.out_dir, logged, set_.model()->config().head == HeadKind::causal_lm);
      }
    }
    if (group_ && (last || stop || (options_.checkpoint_every > 0 && step_ % options_.checkpoint_every == 0)))
      group_->barrier();  // the checkpoint is complete before any rank goes on (or ends)
    if (stop) break;      // early stopping: the best modules are in <out_dir>/best
  }
  set_.model()->eval();
  return history;
}

bool Trainer::after_eval(double value) {
  const bool lower_is_better = set_.model()->config().head == HeadKind::causal_lm;  // perplexity
  const bool improved = std::isnan(best_) || (lower_is_better ? value < best_ : value > best_);
  if (improved) {
    best_ = value;
    evals_since_best_ = 0;
    if (!options_.out_dir.empty() &&
        writer()) {  // keep the best modules (and backbone) beside the last checkpoint
      const fs::path best = fs::path(options_.out_dir) / "best";
      for (const auto& name : trainable_) set_.save(name, (best / name).string());
      if (options_.train_base) save_model(*set_.model(), (best / "base").string());
    }
  } else {
    ++evals_since_best_;
  }
  return options_.early_stopping_patience > 0 && evals_since_best_ >= options_.early_stopping_patience;
}

}  // namespace mdl
