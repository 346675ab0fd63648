#include "mdl/training/evaluation.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <algorithm>
#include <cmath>

#include "mdl/backbones/model.h"
#include "mdl/core/error.h"
#include "mdl/routing/routing_log.h"

namespace mdl {

double macro_f1(const at::Tensor& predicted, const at::Tensor& target, int64_t num_classes) {
  // predicted, target: (N) class ids of the scored positions. Classes seen in neither are left out.
  at::Tensor cm = at::zeros({num_classes * num_classes}, at::kLong);
  cm.index_add_(0, target.to(at::kCPU) * num_classes + predicted.to(at::kCPU),
                at::ones({target.numel()}, at::kLong));
  cm = cm.view({num_classes, num_classes}).to(at::kDouble);  // rows: truth, columns: prediction
  at::Tensor tp = cm.diagonal(), fn = cm.sum(1) - tp, fp = cm.sum(0) - tp;
  at::Tensor seen = (cm.sum(1) + cm.sum(0)) > 0;
  if (seen.sum().item<int64_t>() == 0) return 0;
  at::Tensor f1 = (2 * tp / (2 * tp + fp + fn).clamp_min(1)).masked_select(seen);
  return f1.mean().item<double>();
}

EvalMetrics evaluate_metrics(ModelImpl& model, const Dataset& data, int64_t batch_size,
                             const ExampleRouting& routing) {
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
      nll += at::cross_entropy_loss(out.narrow(1, 0, T - 1).reshape({-1, out.size(2)}), t, {},
                                    at::Reduction::Sum, -100)
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

at::Tensor predict_logits(ModelImpl& model, const Dataset& data, int64_t batch_size,
                          const ExampleRouting& routing) {
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

ExpertUsage measure_expert_usage(ModelImpl& model, const Dataset& data) {
  MDL_CHECK(!data.examples.empty(), "[experts] the data has no examples to measure the experts' use on");
  ExpertUsageMeter meter(model.config());
  const bool was_training = model.is_training();
  model.eval();
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < data.examples.size(); ++i) {
    Batch b = collate(data, {static_cast<int64_t>(i)}, 0, model.device(), {});
    ModelInput in = model_input(b);
    RoutingLog log;
    in.routing_log = &log;
    model.forward(in);
    meter.add(log);
  }
  model.train(was_training);
  return meter.usage();
}

LabelledRouting routing_by_label(ModelImpl& model, const Dataset& data, const std::string& label,
                                 int64_t max_examples) {
  MDL_CHECK(label == "task" || label == "language" || label == "label", "[analyze-routing] --label '", label,
            "' is unknown; expected task, language or label");
  MDL_CHECK(!data.examples.empty(), "[analyze-routing] the data has no examples");
  LabelledRouting out;
  std::map<std::string, int64_t> index;
  std::map<std::string, std::vector<at::Tensor>> probs, rules;
  const bool was_training = model.is_training();
  model.eval();
  torch::NoGradGuard no_grad;
  const size_t n = std::min(data.examples.size(), static_cast<size_t>(std::max<int64_t>(1, max_examples)));
  for (size_t i = 0; i < n; ++i) {
    const Example& e = data.examples[i];
    std::string value = label == "task" ? e.task : label == "language" ? e.language : "";
    if (label == "label") {
      MDL_CHECK(e.label >= 0, "[analyze-routing] example ", e.line, " has no label");
      value =
          e.label < static_cast<int64_t>(data.labels.size()) ? data.labels[e.label] : std::to_string(e.label);
    }
    MDL_CHECK(!value.empty(), "[analyze-routing] example on line ", e.line, " has no '", label,
              "' field; every example needs one");
    auto [it, added] = index.emplace(value, static_cast<int64_t>(out.values.size()));
    if (added) out.values.push_back(value);
    Batch b = collate(data, {static_cast<int64_t>(i)}, 0, model.device(), {});
    ModelInput in = model_input(b);
    RoutingLog log;
    log.keep_weights(true);
    in.routing_log = &log;
    model.forward(in);
    for (const auto& s : log.stats()) {
      if (!s.weights.defined() || s.weights.size(0) == 0) continue;
      if (!probs.count(s.site)) out.sites.push_back(s.site);
      probs[s.site].push_back(s.weights.to(at::kFloat));
      rules[s.site].push_back(at::full({s.weights.size(0)}, it->second, at::kLong));
    }
  }
  model.train(was_training);
  MDL_CHECK(!out.sites.empty(), "[analyze-routing] nothing in this model routes (no mixture of experts, no ",
            "learned router, no Polytropon allocation): there is no routing to analyse");
  for (const auto& site : out.sites) {
    out.probs[site] = at::cat(probs[site], 0);
    out.rules[site] = at::cat(rules[site], 0);
  }
  return out;
}

}  // namespace mdl
