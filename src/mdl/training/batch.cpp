#include "mdl/training/batch.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "mdl/backbones/model.h"
#include "mdl/core/error.h"
#include "mdl/core/fields.h"

namespace mdl {

const FieldList<ExampleRouting>& example_routing_fields() {
  static const FieldList<ExampleRouting> f =
      FieldList<ExampleRouting>("options.routing")
          .add("by_task", &ExampleRouting::by_task,
               "fixed routing: {\"task\": [\"module\", ...]}, the modules each task's examples use")
          .add("by_language", &ExampleRouting::by_language,
               "fixed routing: {\"language\": [\"module\", ...]} (MAD-X language adapters, applied before "
               "the task's)");
  return f;
}

void to_json(nlohmann::json& j, const ExampleRouting& r) {
  j = example_routing_fields().write(r);
}

void from_json(const nlohmann::json& j, ExampleRouting& r) {
  r = example_routing_fields().read(j);
}

int64_t task_index(const Dataset& d, const std::string& task) {
  auto it = std::find(d.tasks.begin(), d.tasks.end(), task);
  return it == d.tasks.end() ? 0 : static_cast<int64_t>(it - d.tasks.begin());
}

int64_t language_index(const Dataset& d, const std::string& language) {
  auto it = std::find(d.languages.begin(), d.languages.end(), language);
  return it == d.languages.end() ? 0 : static_cast<int64_t>(it - d.languages.begin());
}

namespace {

/// A routing table indexed like `keys` (the data's tasks or languages; "" when the data has none): the
/// modules `by` lists for each, at weight 1.
std::vector<std::vector<ModuleChoice>> routing_table(
    const std::map<std::string, std::vector<std::string>>& by, std::vector<std::string> keys,
    const char* what) {
  if (keys.empty()) keys.push_back("");
  std::vector<std::vector<ModuleChoice>> table;
  for (const auto& key : keys) {
    auto it = by.find(key);
    MDL_CHECK(it != by.end(), "[train] the data's ", what, " '", key, "' has no entry in routing.by_", what,
              "; add one, or drop the table to use every module");
    table.emplace_back();
    for (const auto& name : it->second) table.back().push_back({name, 1.0});
  }
  return table;
}

}  // namespace

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
      MDL_CHECK(e.image >= 0 && e.image < d.images.size(0), "[train] example ", e.line, " points at image ",
                e.image, " of ", d.images.size(0));
      rows.push_back(e.image);
    }
    batch.pixels = d.images.index_select(0, at::tensor(rows, at::kLong)).to(device);
  }
  std::vector<int64_t> tasks, languages;
  for (int64_t i : which) {
    tasks.push_back(task_index(d, d.examples[i].task));
    languages.push_back(language_index(d, d.examples[i].language));
  }
  const at::Tensor task_ids = at::tensor(tasks, at::kLong), language_ids = at::tensor(languages, at::kLong);
  if (!d.tasks.empty()) batch.routing.task_ids = task_ids.to(device);
  if (!d.languages.empty()) batch.routing.language_ids = language_ids.to(device);
  if (!routing.empty()) {
    // Each example's modules by its ids: its language's, then its task's on their output (MAD-X stacks a
    // task adapter on a language one).
    std::vector<std::vector<ModuleChoice>> modules(which.size());
    if (!routing.by_language.empty()) {
      const RoutingContext by_language = RoutingContext::by_id(
          language_ids, routing_table(routing.by_language, d.languages, "language"), true);
      for (size_t b = 0; b < which.size(); ++b) modules[b] = by_language.modules[b];
    }
    if (!routing.by_task.empty()) {
      const RoutingContext by_task =
          RoutingContext::by_id(task_ids, routing_table(routing.by_task, d.tasks, "task"));
      for (size_t b = 0; b < which.size(); ++b)
        modules[b].insert(modules[b].end(), by_task.modules[b].begin(), by_task.modules[b].end());
    }
    batch.routing.modules = std::move(modules);
  }
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
  if (head == HeadKind::causal_lm) {
    // Labels without per-token targets: a classification file on a model that only predicts next tokens
    // would train on no target at all (a NaN loss from the first step).
    const bool labelled = !d.examples.empty() &&
                          std::all_of(d.examples.begin(), d.examples.end(),
                                      [](const Example& e) { return e.targets.empty() && e.label >= 0; });
    const std::string seq = model.config().architecture.substr(0, model.config().architecture.find("For")) +
                            "ForSequenceClassification";
    MDL_CHECK(
        !labelled, "[train] the data holds class labels (data.kind classification), but ",
        model.config().architecture,
        " has a causal-LM head: it predicts next tokens, not classes. Give it a classification head "
        "(PEFT's SEQ_CLS on a causal model): set \"architectures\": [\"",
        seq,
        "\"] and \"num_labels\" in a copy of its config.json (the loader initialises the new head), or train "
        "on text (data.kind text or instruction)");
    return;
  }
  if (head != HeadKind::sequence_classification && head != HeadKind::token_classification) return;
  MDL_CHECK(static_cast<int64_t>(d.labels.size()) <= model.config().num_labels, "[train] the data has ",
            d.labels.size(), " labels but the model's head has ", model.config().num_labels,
            "; create the model with more labels (init-model --num-labels) or map the labels");
}

namespace {

/// Causal-LM targets aligned with the positions: position t predicts token t + 1 (the last predicts nothing).
at::Tensor next_tokens(const at::Tensor& targets) {  // (B, T) -> (B, T)
  const int64_t B = targets.size(0), T = targets.size(1);
  return at::cat({targets.narrow(1, 1, T - 1), at::full({B, 1}, -100, targets.options())}, 1);
}

}  // namespace

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

}  // namespace mdl
