// Batches for training and evaluation: examples padded into tensors with the targets their head needs,
// their images, and their routing context: task and language ids, and with fixed routing each example's
// modules, looked up by id (RoutingContext::by_id) in tables indexed like the data's tasks and languages.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "mdl/backbones/model.h"
#include "mdl/routing/routing_context.h"
#include "mdl/training/dataset.h"

namespace mdl {

template <class T>
class FieldList;

/// Fixed per-example routing (the survey's task- and language-level routing): an example uses the
/// modules listed for its language, then those listed for its task (each table applies only when set;
/// a task or language of the data that a set table lacks is an error). Empty: every example uses every
/// active module. MAD-X-style joint training of language adapters is `by_language`.
struct ExampleRouting {
  std::map<std::string, std::vector<std::string>> by_task, by_language;
  bool empty() const { return by_task.empty() && by_language.empty(); }
};
void to_json(nlohmann::json& j, const ExampleRouting& r);
void from_json(const nlohmann::json& j, ExampleRouting& r);
/// The fields of ExampleRouting: JSON keys, defaults and meanings (core/fields.h).
const FieldList<ExampleRouting>& example_routing_fields();

/// A padded batch of examples: inputs, mask, and the targets the head needs.
struct Batch {
  at::Tensor ids, mask, labels, targets;  // (B, T), (B, T), (B), (B, T)
  at::Tensor pixels;                      // (B, C, H, W) for image data
  RoutingContext routing;                 // task ids (B) when the data has tasks
};

/// The index of `task` (or `language`) among the data's tasks (languages); 0 when absent.
int64_t task_index(const Dataset& d, const std::string& task);
int64_t language_index(const Dataset& d, const std::string& language);
/// Examples `which` of `d`, padded with `pad`, on `device`, with their routing context.
Batch collate(const Dataset& d, const std::vector<int64_t>& which, int64_t pad, c10::Device device,
              const ExampleRouting& routing);
/// The model's input for a batch (its routing context when it has one).
ModelInput model_input(const Batch& b);
/// Classification data must fit the head: its labels index the head's outputs.
void check_labels(const ModelImpl& model, const Dataset& d);
/// The head's training loss on a batch (float32 whatever the logits' precision).
at::Tensor task_loss(ModelImpl& model, const ModelInput& in, const Batch& b);

}  // namespace mdl
