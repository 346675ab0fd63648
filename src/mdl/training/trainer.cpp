#include "mdl/training/trainer.h"

#include <ATen/ATen.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>
#include <torch/utils.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>

#include "mdl/core/autocast.h"
#include "mdl/core/error.h"
#include "mdl/core/fields.h"
#include "mdl/distributed/process_group.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/json_file.h"
#include "mdl/io/safetensors.h"
#include "mdl/modules/module_set.h"
#include "mdl/report/plot.h"
#include "mdl/routing/routing_context.h"
#include "mdl/routing/routing_log.h"

namespace mdl {
namespace fs = std::filesystem;

const FieldList<ExampleRouting>& example_routing_fields() {
  static const FieldList<ExampleRouting> f = FieldList<ExampleRouting>("options.routing")
      .add("by_task", &ExampleRouting::by_task, "fixed routing: {\"task\": [\"module\", ...]}, the modules each task's examples use")
      .add("by_language", &ExampleRouting::by_language,
           "fixed routing: {\"language\": [\"module\", ...]} (MAD-X language adapters, applied before the task's)");
  return f;
}

void to_json(nlohmann::json& j, const ExampleRouting& r) { j = example_routing_fields().write(r); }

void from_json(const nlohmann::json& j, ExampleRouting& r) { r = example_routing_fields().read(j); }

const FieldList<TrainOptions>& train_options_fields() {
  using O = TrainOptions;
  static const FieldList<O> f = FieldList<O>("options")
      .add("steps", &O::steps, "optimiser steps")
      .add("batch_size", &O::batch_size, "examples per micro-batch")
      .add("grad_accumulation", &O::grad_accumulation, "micro-batches per optimiser step")
      .add("weight_decay", &O::weight_decay, "AdamW decoupled weight decay")
      .add("clip_grad_norm", &O::clip_grad_norm, "maximum global gradient norm (0: no clipping)")
      .add("aux_loss_weight", &O::aux_loss_weight, "weight of the routers' auxiliary losses (load balancing, z-loss)")
      .add("eval_every", &O::eval_every, "evaluate every N steps (0: at the end only)")
      .add("checkpoint_every", &O::checkpoint_every, "write a checkpoint every N steps (0: at the end only)")
      .add("seed", &O::seed, "data order and per-step randomness")
      .add("out_dir", &O::out_dir, "metrics.jsonl, checkpoint/ and the trained modules go here")
      .add("train_base", &O::train_base, "train the backbone's own parameters too (full fine-tuning, training from scratch)")
      .add("early_stopping_patience", &O::early_stopping_patience,
           "stop after this many evaluations without improvement (0: never)")
      .add("task_sampling", &O::task_sampling, "multi-task data: proportional | temperature | uniform")
      .add("sampling_temperature", &O::sampling_temperature, "temperature sampling: n_i^(1/T), normalised")
      .add("routing", &O::routing, example_routing_fields(), "fixed per-example module choice by task or language")
      .add("precision", &O::precision,
           "fp32 | bf16 (autocast: matrix products in bfloat16, weights in float32) | fp16 (CUDA)")
      .add("gradient_checkpointing", &O::gradient_checkpointing,
           "rerun each layer during backward instead of keeping its activations (less memory, ~1/3 more compute)")
      .add("schedule", &O::schedule, schedule_fields(), "learning rate over steps")
      .check([](const O& o) { validate(o); });
  return f;
}

void to_json(nlohmann::json& j, const TrainOptions& o) { j = train_options_fields().write(o); }

void from_json(const nlohmann::json& j, TrainOptions& o) { o = train_options_fields().read(j); }

void validate(const TrainOptions& o) {
  validate(o.schedule);
  autocast_dtype(o.precision);  // validates
  task_sampling_probabilities({1}, o.task_sampling, o.sampling_temperature);  // validates
  MDL_CHECK(o.steps > 0 && o.batch_size > 0 && o.grad_accumulation > 0, "[train] steps, batch_size and "
            "grad_accumulation must be > 0, got ", o.steps, ", ", o.batch_size, ", ", o.grad_accumulation);
  // A batch is built whole in memory: past these, a run would exhaust it before its first step.
  MDL_CHECK(o.batch_size <= 65536 && o.grad_accumulation <= 65536, "[train] options.batch_size ", o.batch_size,
            " and options.grad_accumulation ", o.grad_accumulation, " must be at most 65536 (examples held in memory "
            "at once); a larger batch is batch_size x grad_accumulation");
}

namespace {

/// A padded batch of examples: inputs, mask, and the targets the head needs.
struct Batch {
  at::Tensor ids, mask, labels, targets;  // (B, T), (B, T), (B), (B, T)
  at::Tensor pixels;                      // (B, C, H, W) for image data
  RoutingContext routing;                 // task ids (B) when the data has tasks
};

int64_t task_index(const Dataset& d, const std::string& task) {
  auto it = std::find(d.tasks.begin(), d.tasks.end(), task);
  return it == d.tasks.end() ? 0 : static_cast<int64_t>(it - d.tasks.begin());
}

int64_t language_index(const Dataset& d, const std::string& language) {
  auto it = std::find(d.languages.begin(), d.languages.end(), language);
  return it == d.languages.end() ? 0 : static_cast<int64_t>(it - d.languages.begin());
}

/// The modules example `e` uses under `r`.
std::vector<ModuleChoice> example_modules(const Example& e, const ExampleRouting& r) {
  std::vector<ModuleChoice> out;
  auto add = [&](const std::map<std::string, std::vector<std::string>>& table, const std::string& key, const char* what) {
    if (table.empty()) return;
    auto it = table.find(key);
    MDL_CHECK(it != table.end(), "[train] line ", e.line, ": the example's ", what, " '", key, "' has no entry in routing.by_",
              what, "; add one, or drop the table to use every module");
    for (const auto& name : it->second) out.push_back({name, 1.0});
  };
  // The language's modules first, the task's on their output (MAD-X stacks a task adapter on a language one).
  add(r.by_language, e.language, "language");
  add(r.by_task, e.task, "task");
  return out;
}

Batch collate(const Dataset& d, const std::vector<int64_t>& which, int64_t pad, c10::Device device,
              const ExampleRouting& routing) {
  int64_t T = 0;
  for (int64_t i : which) T = std::max<int64_t>(T, static_cast<int64_t>(d.examples[i].ids.size()));
  const int64_t B = static_cast<int64_t>(which.size());
  at::Tensor ids = at::full({B, T}, pad, at::kLong), mask = at::zeros({B, T}, at::kLong);
  at::Tensor labels = at::full({B}, -100, at::kLong), targets = at::full({B, T}, -100, at::kLong);
  for (int64_t b = 0; b < B; ++b) {
    const Example& e = d.examples[which[b]];
    const int64_t n = static_cast<int64_t>(e.ids.size());
    ids[b].narrow(0, 0, n).copy_(at::tensor(e.ids, at::kLong));
    mask[b].narrow(0, 0, n).fill_(1);
    labels[b] = e.label;
    if (!e.targets.empty()) targets[b].narrow(0, 0, n).copy_(at::tensor(e.targets, at::kLong));
  }
  Batch batch{ids.to(device), mask.to(device), labels.to(device), targets.to(device), {}, {}};
  if (d.images.defined()) {
    std::vector<int64_t> rows;
    for (int64_t i : which) {
      const Example& e = d.examples[i];
      MDL_CHECK(e.image >= 0 && e.image < d.images.size(0), "[train] example ", e.line, " points at image ", e.image,
                " of ", d.images.size(0));
      rows.push_back(e.image);
    }
    batch.pixels = d.images.index_select(0, at::tensor(rows, at::kLong)).to(device);
  }
  if (!d.tasks.empty()) {
    std::vector<int64_t> tasks;
    for (int64_t i : which) tasks.push_back(task_index(d, d.examples[i].task));
    batch.routing.task_ids = at::tensor(tasks, at::kLong).to(device);
  }
  if (!d.languages.empty()) {
    std::vector<int64_t> languages;
    for (int64_t i : which) languages.push_back(language_index(d, d.examples[i].language));
    batch.routing.language_ids = at::tensor(languages, at::kLong).to(device);
  }
  if (!routing.empty())
    for (int64_t i : which) batch.routing.modules.push_back(example_modules(d.examples[i], routing));
  return batch;
}

ModelInput model_input(const Batch& b) {
  ModelInput in;
  in.input_ids = b.ids;
  in.attention_mask = b.mask;
  in.pixel_values = b.pixels;
  if (b.routing.task_ids.defined() || b.routing.language_ids.defined() || !b.routing.modules.empty())
    in.routing = &b.routing;
  return in;
}

/// Classification data must fit the head: its labels index the head's outputs.
void check_labels(const ModelImpl& model, const Dataset& d) {
  const HeadKind head = model.config().head;
  if (head != HeadKind::sequence_classification && head != HeadKind::token_classification) return;
  MDL_CHECK(static_cast<int64_t>(d.labels.size()) <= model.config().num_labels, "[train] the data has ", d.labels.size(),
            " labels but the model's head has ", model.config().num_labels,
            "; create the model with more labels (init-model --num-labels) or map the labels");
}

/// Causal-LM targets aligned with the positions: position t predicts token t + 1 (the last predicts nothing).
at::Tensor next_tokens(const at::Tensor& targets) {  // (B, T) -> (B, T)
  const int64_t B = targets.size(0), T = targets.size(1);
  return at::cat({targets.narrow(1, 1, T - 1), at::full({B, 1}, -100, targets.options())}, 1);
}

/// The head's training loss on a batch (float32 whatever the logits' precision).
at::Tensor task_loss(ModelImpl& model, const ModelInput& in, const Batch& b) {
  const HeadKind head = model.config().head;
  if (head == HeadKind::causal_lm)
    return model.lm_loss(in, next_tokens(b.targets));  // logits never held whole
  const at::Tensor out = model.forward(in);
  switch (head) {
    case HeadKind::sequence_classification:
      return at::cross_entropy_loss(out.to(at::kFloat), b.labels);
    case HeadKind::token_classification:
      return at::cross_entropy_loss(out.reshape({-1, out.size(2)}).to(at::kFloat), b.targets.reshape({-1}));
    case HeadKind::causal_lm:
    case HeadKind::none:
      break;
  }
  MDL_FAIL("[train] the model has no head to train against; create it with a classification or LM head");
}

std::string metrics_line(const TrainMetrics& m) {
  nlohmann::json j = {{"step", m.step}, {"loss", m.loss}, {"lr", m.lr}};
  if (m.eval >= 0) j["eval"] = m.eval;
  if (m.f1 >= 0) j["f1"] = m.f1;
  if (!m.eval_tasks.empty()) j["eval_tasks"] = m.eval_tasks;
  if (!m.routing.empty()) j["routing"] = m.routing;
  return j.dump() + "\n";
}

}  // namespace

std::vector<TrainMetrics> read_metrics(const std::string& path) {
  std::vector<TrainMetrics> out;
  const std::string text = io::read_text(path);
  size_t start = 0, line = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    ++line;
    if (end > start) {
      const auto j = nlohmann::json::parse(text.begin() + static_cast<std::ptrdiff_t>(start),
                                           text.begin() + static_cast<std::ptrdiff_t>(end), nullptr, false);
      MDL_CHECK(j.is_object() && j.contains("step") && j.contains("loss"), "[train] '", path, "' line ", line,
                ": expected a metrics record {\"step\", \"loss\", ...}");
      TrainMetrics m;
      m.step = j["step"].get<int64_t>();
      m.loss = j["loss"].get<double>();
      m.lr = j.value("lr", 0.0);
      m.eval = j.value("eval", -1.0);
      m.f1 = j.value("f1", -1.0);
      if (j.contains("eval_tasks")) m.eval_tasks = j["eval_tasks"].get<std::map<std::string, double>>();
      if (j.contains("routing")) m.routing = j["routing"].get<std::map<std::string, double>>();
      out.push_back(m);
    }
    start = end + 1;
  }
  return out;
}

void write_training_plots(const std::string& dir, const std::vector<TrainMetrics>& metrics, bool eval_is_perplexity) {
  Series loss{"training loss", {}, {}}, eval{eval_is_perplexity ? "perplexity" : "accuracy", {}, {}};
  for (const auto& m : metrics) {
    loss.x.push_back(static_cast<double>(m.step)), loss.y.push_back(m.loss);
    if (m.eval >= 0) eval.x.push_back(static_cast<double>(m.step)), eval.y.push_back(m.eval);
  }
  if (loss.x.empty()) return;
  PlotOptions o;
  o.title = "Training loss", o.x_label = "step", o.y_label = "loss";
  write_line_plot((fs::path(dir) / "loss.svg").string(), {loss}, o);
  if (eval.x.empty()) return;
  o.title = eval_is_perplexity ? "Evaluation perplexity" : "Evaluation accuracy";
  o.y_label = eval.name;
  o.log_y = eval_is_perplexity;
  write_line_plot((fs::path(dir) / "eval.svg").string(), {eval}, o);
}

struct Trainer::State {
  std::vector<std::string> keys;  // "<module>/<tensor>" of every trainable tensor, in parameter order
  std::vector<at::Tensor> params;
  std::unique_ptr<torch::optim::AdamW> optimizer;
  int64_t epoch = -1;          // the epoch whose example order `order` holds
  std::vector<int64_t> order;

  std::vector<std::vector<int64_t>> by_task;  // example indices of each task (multi-task data)
  std::vector<double> task_cdf;               // cumulative sampling probabilities of the tasks

  /// Example index of global sample i, a function of (seed, i) so a resumed run reads the same data.
  /// Multi-task data: a task drawn from the sampling distribution, then an example of it (with
  /// replacement); otherwise the (i mod n)-th of epoch (i / n)'s permutation.
  int64_t sample(int64_t i, int64_t n, uint64_t seed) {
    if (by_task.empty()) return example(i, n, seed);
    std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(i));
    const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
    const size_t t = std::min<size_t>(std::upper_bound(task_cdf.begin(), task_cdf.end(), u) - task_cdf.begin(),
                                      by_task.size() - 1);
    const auto& pool = by_task[t];
    return pool[std::uniform_int_distribution<size_t>(0, pool.size() - 1)(rng)];
  }

  int64_t example(int64_t i, int64_t n, uint64_t seed) {
    if (i / n != epoch) {
      epoch = i / n;
      order.resize(static_cast<size_t>(n));
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), std::mt19937_64(seed + static_cast<uint64_t>(epoch)));
    }
    return order[static_cast<size_t>(i % n)];
  }
};

Trainer::Trainer(ModuleSet& set, std::vector<std::string> trainable, TrainOptions options)
    : set_(set), trainable_(std::move(trainable)), options_(std::move(options)), state_(std::make_unique<State>()) {
  validate(options_);
  MDL_CHECK(!trainable_.empty() || options_.train_base, "[train] name the modules to train, or set train_base");
  if (trainable_.empty()) {  // the backbone alone: every module frozen
    set_.freeze_base({});
    for (auto& t : set_.parameters()) t.set_requires_grad(false);
  } else {
    set_.freeze_base(trainable_);
  }
  for (const auto& name : trainable_)
    for (const auto& [k, t] : set_.tensors(name))
      if (t.requires_grad()) state_->keys.push_back(name + "/" + k), state_->params.push_back(t);
  if (options_.train_base)
    for (auto& p : set_.model()->named_parameters()) {
      p.value().set_requires_grad(true);
      state_->keys.push_back("base/" + p.key()), state_->params.push_back(p.value());
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
  return {{"aux_loss", log.aux_loss().item<double>()}, {"entropy", entropy / n}, {"dropped_fraction", dropped / n},
          {"max_load", max_load}};
}

}  // namespace

double Trainer::train_step(const Dataset& data, std::map<std::string, double>& routing) {
  ModelImpl& model = *set_.model();
  const int64_t n = static_cast<int64_t>(data.examples.size());
  const int64_t pad = std::max<int64_t>(0, model.config().pad_token_id);
  at::manual_seed(static_cast<uint64_t>(options_.seed * 1000003u + static_cast<uint64_t>(step_)));  // dropout, sampling
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
      which.push_back(state_->sample((step_ * options_.grad_accumulation + m) * options_.batch_size + rank * local + j, n,
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
        lines += (i ? ", " : "") + (e.line > 0 ? "line " + std::to_string(e.line) : "example " + std::to_string(which[i]));
      }
      MDL_FAIL("[train] step ", step_ + 1, ": the loss is ", value, " on a batch of ", which.size(), " examples (", lines,
               which.size() > 8 ? ", ..." : "", "); no update was made. Lower the learning rate (options.schedule.lr), "
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
    at::Tensor loss = at::full({1}, total, state_->params[0].options().dtype(at::kDouble));  // NCCL wants device tensors
    buffers.push_back(loss);
    bytes_communicated_ = group_->all_reduce_mean(buffers) - static_cast<int64_t>(sizeof(double));
    total = loss.item<double>();
  }
  if (options_.clip_grad_norm > 0) torch::nn::utils::clip_grad_norm_(state_->params, options_.clip_grad_norm);
  opt.step();
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

bool Trainer::writer() const { return !group_ || group_->rank() == 0; }

double Trainer::evaluate(const Dataset& data) { return evaluate_metrics(data).primary(); }

EvalMetrics Trainer::evaluate_metrics(const Dataset& data) {
  return mdl::evaluate_metrics(*set_.model(), data, options_.batch_size, options_.routing);
}

double macro_f1(const at::Tensor& predicted, const at::Tensor& target, int64_t num_classes) {
  // predicted, target: (N) class ids of the scored positions. Classes seen in neither are left out.
  at::Tensor cm = at::zeros({num_classes * num_classes}, at::kLong);
  cm.index_add_(0, target.to(at::kCPU) * num_classes + predicted.to(at::kCPU), at::ones({target.numel()}, at::kLong));
  cm = cm.view({num_classes, num_classes}).to(at::kDouble);  // rows: truth, columns: prediction
  at::Tensor tp = cm.diagonal(), fn = cm.sum(1) - tp, fp = cm.sum(0) - tp;
  at::Tensor seen = (cm.sum(1) + cm.sum(0)) > 0;
  if (seen.sum().item<int64_t>() == 0) return 0;
  at::Tensor f1 = (2 * tp / (2 * tp + fp + fn).clamp_min(1)).masked_select(seen);
  return f1.mean().item<double>();
}

EvalMetrics evaluate_metrics(ModelImpl& model, const Dataset& data, int64_t batch_size, const ExampleRouting& routing) {
  MDL_CHECK(batch_size > 0, "[eval] batch size must be > 0, got ", batch_size);
  check_labels(model, data);
  const bool was_training = model.is_training();
  model.eval();
  torch::NoGradGuard no_grad;
  const int64_t pad = std::max<int64_t>(0, model.config().pad_token_id);
  const HeadKind head = model.config().head;
  double nll = 0, count = 0;
  std::vector<at::Tensor> predicted, truth;  // classification: the scored positions' classes
  for (size_t start = 0; start < data.examples.size(); start += static_cast<size_t>(batch_size)) {
    std::vector<int64_t> which;
    for (size_t i = start; i < std::min(data.examples.size(), start + static_cast<size_t>(batch_size)); ++i)
      which.push_back(static_cast<int64_t>(i));
    Batch b = collate(data, which, pad, model.device(), routing);
    ModelInput in = model_input(b);
    at::Tensor out = model.forward(in).to(at::kFloat);
    if (head == HeadKind::sequence_classification) {
      predicted.push_back(out.argmax(-1)), truth.push_back(b.labels);
    } else if (head == HeadKind::token_classification) {
      at::Tensor real = b.targets != -100;
      predicted.push_back(out.argmax(-1).masked_select(real)), truth.push_back(b.targets.masked_select(real));
    } else {
      const int64_t T = out.size(1);
      at::Tensor t = b.targets.narrow(1, 1, T - 1).reshape({-1});
      nll += at::cross_entropy_loss(out.narrow(1, 0, T - 1).reshape({-1, out.size(2)}), t, {}, at::Reduction::Sum, -100)
                 .item<double>();
      count += (t != -100).sum().item<double>();
    }
  }
  if (was_training) model.train();
  EvalMetrics m;
  if (head == HeadKind::causal_lm) {
    MDL_CHECK(count > 0, "[eval] no tokens to evaluate");
    m.perplexity = std::exp(nll / count);
    return m;
  }
  MDL_CHECK(!truth.empty(), "[eval] no examples to evaluate");
  at::Tensor p = at::cat(predicted), t = at::cat(truth);
  MDL_CHECK(t.numel() > 0, "[eval] no labelled tokens to evaluate");
  m.accuracy = (p == t).to(at::kDouble).mean().item<double>();
  m.macro_f1 = macro_f1(p, t, model.config().num_labels);
  return m;
}

at::Tensor predict_logits(ModelImpl& model, const Dataset& data, int64_t batch_size, const ExampleRouting& routing) {
  MDL_CHECK(batch_size > 0, "[eval] batch size must be > 0, got ", batch_size);
  const bool was_training = model.is_training();
  model.eval();
  torch::NoGradGuard no_grad;
  const int64_t pad = std::max<int64_t>(0, model.config().pad_token_id);
  std::vector<at::Tensor> out;
  for (size_t start = 0; start < data.examples.size(); start += static_cast<size_t>(batch_size)) {
    std::vector<int64_t> which;
    for (size_t i = start; i < std::min(data.examples.size(), start + static_cast<size_t>(batch_size)); ++i)
      which.push_back(static_cast<int64_t>(i));
    Batch b = collate(data, which, pad, model.device(), routing);
    out.push_back(model.forward(model_input(b)).to(at::kFloat).cpu());
  }
  if (was_training) model.train();
  MDL_CHECK(!out.empty(), "[eval] no examples to predict");
  return at::cat(out);
}

double evaluate(ModelImpl& model, const Dataset& data, int64_t batch_size, const ExampleRouting& routing) {
  return evaluate_metrics(model, data, batch_size, routing).primary();
}

std::map<std::string, double> evaluate_per_task(ModelImpl& model, const Dataset& data, int64_t batch_size,
                                                const ExampleRouting& routing) {
  std::map<std::string, double> out;
  for (const auto& task : data.tasks) {
    Dataset subset;
    subset.labels = data.labels;
    subset.tasks = data.tasks;  // keep the task and language indices
    subset.languages = data.languages;
    subset.images = data.images;
    for (const auto& e : data.examples)
      if (e.task == task) subset.examples.push_back(e);
    out[task] = evaluate(model, subset, batch_size, routing);
  }
  return out;
}

std::vector<TrainMetrics> Trainer::train(const Dataset& data, const Dataset* eval,
                                         const std::function<void(const TrainMetrics&)>& on_step) {
  check_labels(*set_.model(), data);
  if (eval) check_labels(*set_.model(), *eval);
  std::vector<TrainMetrics> history;
  state_->by_task.clear();
  state_->task_cdf.clear();
  if (data.tasks.size() > 1) {
    state_->by_task.resize(data.tasks.size());
    for (size_t e = 0; e < data.examples.size(); ++e)
      state_->by_task[static_cast<size_t>(task_index(data, data.examples[e].task))].push_back(static_cast<int64_t>(e));
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
    if (stop) break;  // early stopping: the best modules are in <out_dir>/best
  }
  set_.model()->eval();
  return history;
}

void Trainer::save_checkpoint(const std::string& dir) const {
  const std::string tmp = dir + ".tmp";
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  for (const auto& name : trainable_) set_.save(name, (fs::path(tmp) / "modules" / name).string());
  if (options_.train_base) {
    std::map<std::string, at::Tensor> base;
    for (const auto& p : set_.model()->named_parameters()) base[p.key()] = p.value();
    io::save_safetensors((fs::path(tmp) / "base.safetensors").string(), base);
  }
  std::map<std::string, at::Tensor> moments;
  const auto& states = state_->optimizer->state();
  for (size_t i = 0; i < state_->params.size(); ++i) {
    auto it = states.find(c10::guts::to_string(state_->params[i].unsafeGetTensorImpl()));
    if (it == states.end()) continue;  // no step taken yet
    const auto& s = static_cast<const torch::optim::AdamWParamState&>(*it->second);
    moments[state_->keys[i] + ".exp_avg"] = s.exp_avg();
    moments[state_->keys[i] + ".exp_avg_sq"] = s.exp_avg_sq();
    moments[state_->keys[i] + ".step"] = at::tensor(s.step(), at::kLong);
  }
  io::save_safetensors((fs::path(tmp) / "optimizer.safetensors").string(), moments);
  nlohmann::json j = {{"step", step_}, {"options", options_}, {"modules", trainable_},
                      {"best", std::isnan(best_) ? nlohmann::json(nullptr) : nlohmann::json(best_)},
                      {"evals_since_best", evals_since_best_}};
  io::write_text_atomic((fs::path(tmp) / "trainer.json").string(), j.dump(2) + "\n");
  // Swap the complete directory in: a crash leaves either the old checkpoint or the new one.
  const std::string old = dir + ".old";
  fs::remove_all(old);
  if (fs::exists(dir)) fs::rename(dir, old);
  fs::rename(tmp, dir);
  fs::remove_all(old);
}

std::string find_checkpoint(const std::string& dir) {
  for (const std::string& d : {dir, dir + ".old"})
    if (fs::exists(fs::path(d) / "trainer.json")) return d;
  return "";
}

void Trainer::load_checkpoint(const std::string& requested) {
  const std::string dir = find_checkpoint(requested);
  MDL_CHECK(!dir.empty(), "[train] '", requested, "' is not a checkpoint (no trainer.json)");
  const fs::path meta = fs::path(dir) / "trainer.json";
  const nlohmann::json j = io::read_json(meta.string());
  // Every field is checked before anything is restored: a checkpoint is a file anyone can edit.
  const std::string where = "[train] checkpoint '" + meta.string() + "': ";
  MDL_CHECK(j.is_object(), where, "must hold a JSON object");
  MDL_CHECK(j.contains("modules") && j["modules"].is_array() &&
                std::all_of(j["modules"].begin(), j["modules"].end(), [](const nlohmann::json& m) { return m.is_string(); }),
            where, "field 'modules' must be a list of module names");
  MDL_CHECK(j["modules"].get<std::vector<std::string>>() == trainable_, where, "trains ", j["modules"].dump(),
            ", this run trains other modules");
  MDL_CHECK(j.contains("step") && j["step"].is_number_integer(), where, "field 'step' must be an integer");
  const int64_t step = j["step"].get<int64_t>();
  MDL_CHECK(step >= 0 && step <= options_.steps, where, "field 'step' is ", step, "; a checkpoint of this run is at a "
            "step in 0..", options_.steps, " (options.steps)");
  MDL_CHECK(!j.contains("best") || j["best"].is_null() || (j["best"].is_number() && std::isfinite(j["best"].get<double>())),
            where, "field 'best' must be a finite number or null");
  MDL_CHECK(!j.contains("evals_since_best") || (j["evals_since_best"].is_number_integer() && j["evals_since_best"].get<int64_t>() >= 0),
            where, "field 'evals_since_best' must be an integer >= 0");
  for (const auto& name : trainable_) {
    const std::string mdir = (fs::path(dir) / "modules" / name).string();
    set_.load_tensors(name, io::load_safetensors((fs::path(mdir) / "module.safetensors").string()), mdir);
  }
  if (options_.train_base) {
    const std::string file = (fs::path(dir) / "base.safetensors").string();
    MDL_CHECK(fs::exists(file), "[train] checkpoint '", dir, "' has no backbone weights, but this run trains the backbone");
    auto base = io::load_safetensors(file);
    torch::NoGradGuard no_grad;
    for (auto& p : set_.model()->named_parameters()) {
      auto it = base.find(p.key());
      MDL_CHECK(it != base.end() && it->second.sizes() == p.value().sizes(), "[train] checkpoint '", file,
                "' lacks backbone tensor '", p.key(), "' or its shape differs");
      p.value().copy_(it->second);
    }
  }
  auto moments = io::load_safetensors((fs::path(dir) / "optimizer.safetensors").string());
  auto& states = state_->optimizer->state();
  for (size_t i = 0; i < state_->params.size(); ++i) {
    const std::string& k = state_->keys[i];
    if (!moments.count(k + ".exp_avg")) continue;
    for (const char* part : {".exp_avg", ".exp_avg_sq"}) {
      MDL_CHECK(moments.count(k + part) && moments.at(k + part).sizes() == state_->params[i].sizes() &&
                    at::isFloatingType(moments.at(k + part).scalar_type()),
                "[train] checkpoint '", dir, "/optimizer.safetensors': '", k, part, "' is missing or not a floating "
                "tensor of shape ", shape_str(state_->params[i].sizes().vec()));
    }
    MDL_CHECK(moments.count(k + ".step") && moments.at(k + ".step").numel() == 1 &&
                  moments.at(k + ".step").item<double>() >= 0,
              "[train] checkpoint '", dir, "/optimizer.safetensors': '", k, ".step' must be one number >= 0");
    auto s = std::make_unique<torch::optim::AdamWParamState>();
    s->exp_avg(moments.at(k + ".exp_avg").clone());
    s->exp_avg_sq(moments.at(k + ".exp_avg_sq").clone());
    s->step(moments.at(k + ".step").item<int64_t>());
    states[c10::guts::to_string(state_->params[i].unsafeGetTensorImpl())] = std::move(s);
  }
  step_ = step;
  best_ = j.contains("best") && j["best"].is_number() ? j["best"].get<double>() : std::numeric_limits<double>::quiet_NaN();
  evals_since_best_ = j.value("evals_since_best", int64_t{0});
}

bool Trainer::after_eval(double value) {
  const bool lower_is_better = set_.model()->config().head == HeadKind::causal_lm;  // perplexity
  const bool improved = std::isnan(best_) || (lower_is_better ? value < best_ : value > best_);
  if (improved) {
    best_ = value;
    evals_since_best_ = 0;
    if (!options_.out_dir.empty() && writer()) {  // keep the best modules (and backbone) beside the last checkpoint
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
