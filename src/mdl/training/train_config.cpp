#include "mdl/training/train_config.h"

#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/io/json_file.h"

namespace mdl {
namespace {

using nlohmann::json;

// What each field means, by its path in the document. Defaults come from the structs themselves.
const std::vector<std::pair<std::string, std::string>>& descriptions() {
  static const std::vector<std::pair<std::string, std::string>> d = {
      {"model", "checkpoint directory (Hugging Face layout) of the frozen backbone"},
      {"modules", "new modules by name: {\"name\": {\"type\": \"lora\", \"options\": {...}, \"targets\": {...}}}"},
      {"load", "existing module directories to load first (mdl, PEFT, AdapterHub)"},
      {"train", "names of the modules to train; default: every module under 'modules'"},
      {"train_data", "JSONL training file"},
      {"eval_data", "JSONL evaluation file (optional)"},
      {"data.kind", "classification | tagging | instruction | text"},
      {"data.on_bad_record", "fail | skip (skipped records are counted and warned about)"},
      {"data.max_length", "longer examples are truncated to this many tokens"},
      {"data.labels", "label names in index order; empty: collected in order of appearance"},
      {"options.steps", "optimiser steps"},
      {"options.batch_size", "examples per micro-batch"},
      {"options.grad_accumulation", "micro-batches per optimiser step"},
      {"options.weight_decay", "AdamW decoupled weight decay"},
      {"options.clip_grad_norm", "maximum global gradient norm (0: no clipping)"},
      {"options.aux_loss_weight", "weight of the routers' auxiliary losses (load balancing, z-loss)"},
      {"options.eval_every", "evaluate every N steps (0: at the end only)"},
      {"options.checkpoint_every", "write a checkpoint every N steps (0: at the end only)"},
      {"options.seed", "data order and per-step randomness"},
      {"options.out_dir", "metrics.jsonl, checkpoint/ and the trained modules go here"},
      {"options.train_base", "train the backbone's own parameters too (full fine-tuning, training from scratch)"},
      {"options.early_stopping_patience", "stop after this many evaluations without improvement (0: never)"},
      {"options.task_sampling", "multi-task data: proportional | temperature | uniform"},
      {"options.sampling_temperature", "temperature sampling: n_i^(1/T), normalised"},
      {"options.routing.by_task", "fixed routing: {\"task\": [\"module\", ...]}, the modules each task's examples use"},
      {"options.routing.by_language", "fixed routing: {\"language\": [\"module\", ...]} (MAD-X language adapters)"},
      {"options.precision", "fp32 | bf16 (autocast: matrix products in bfloat16, weights in float32) | fp16 (CUDA)"},
      {"options.gradient_checkpointing", "rerun each layer during backward instead of keeping its activations "
                                         "(less memory, ~1/3 more compute)"},
      {"options.schedule.kind", "constant | linear | cosine learning-rate schedule"},
      {"options.schedule.lr", "peak learning rate"},
      {"options.schedule.warmup_steps", "linear warm-up steps"},
      {"options.schedule.total_steps", "where the decay ends (default: options.steps)"},
      {"options.schedule.min_lr_ratio", "the decay's floor as a fraction of lr"},
      {"resume", "continue from <out_dir>/checkpoint when it exists"},
      {"branches", "Branch-Train-Merge: [{\"name\", \"train_data\"}, ...], each trains the one 'modules' entry on its data"},
      {"branch_merge.method", "how the branches merge: linear | task_arithmetic | ties | dare_linear | dare_ties | ..."},
      {"branch_merge.density", "ties / dare: fraction of entries kept"},
      {"branch_merge.lambda", "scale of the merged task vector"},
      {"device", "cpu | cuda | cuda:N"},
  };
  return d;
}

json to_json_config(const TrainConfig& c) {
  json modules = json::object();
  for (const auto& [k, v] : c.modules) modules[k] = v;
  json branches = json::array();
  for (const auto& b : c.branches) branches.push_back({{"name", b.name}, {"train_data", b.train_data}});
  json data = {{"kind", c.data.kind}, {"on_bad_record", c.data.on_bad_record}, {"max_length", c.data.max_length},
               {"labels", c.data.labels}};
  return {{"model", c.model}, {"modules", modules}, {"load", c.load}, {"train", c.train},
          {"train_data", c.train_data}, {"eval_data", c.eval_data}, {"data", data}, {"options", c.options},
          {"resume", c.resume}, {"device", c.device}, {"branches", branches},
          {"branch_merge", {{"method", c.branch_merge.method}, {"density", c.branch_merge.density},
                            {"lambda", c.branch_merge.lambda}}}};
}

void leaves(const json& j, const std::string& prefix, std::vector<std::pair<std::string, std::string>>& out) {
  if (j.is_object() && !j.empty() && prefix != "modules") {
    for (const auto& [k, v] : j.items()) leaves(v, prefix.empty() ? k : prefix + "." + k, out);
  } else {
    out.push_back({prefix, j.dump()});
  }
}

}  // namespace

TrainConfig parse_train_config(const std::string& text, const std::string& source) {
  const json j = io::parse_json(text, source);
  MDL_CHECK(j.is_object(), "[train] '", source, "' must hold a JSON object");
  const json known = to_json_config(TrainConfig());
  for (const auto& [k, v] : j.items())
    MDL_CHECK(known.contains(k), "[train] '", source, "': unknown field '", k, "'; see mdl train --help-config");
  TrainConfig c;
  try {
    c.model = j.value("model", c.model);
    if (j.contains("modules"))
      for (const auto& [name, m] : j["modules"].items()) c.modules[name] = m.get<ModuleConfig>();
    c.load = j.value("load", c.load);
    c.train = j.value("train", c.train);
    c.train_data = j.value("train_data", c.train_data);
    c.eval_data = j.value("eval_data", c.eval_data);
    if (j.contains("data")) {
      const json& d = j["data"];
      c.data.kind = d.value("kind", c.data.kind);
      c.data.on_bad_record = d.value("on_bad_record", c.data.on_bad_record);
      c.data.max_length = d.value("max_length", c.data.max_length);
      c.data.labels = d.value("labels", c.data.labels);
    }
    json options = j.value("options", json::object());
    if (!options.contains("schedule") || !options["schedule"].contains("total_steps"))
      options["schedule"]["total_steps"] = options.value("steps", TrainOptions().steps);
    c.options = options.get<TrainOptions>();
    c.resume = j.value("resume", c.resume);
    if (j.contains("branches")) {
      MDL_CHECK(j["branches"].is_array(), "field 'branches' must be an array of {\"name\", \"train_data\"}");
      for (const auto& b : j["branches"]) {
        MDL_CHECK(b.is_object() && b.contains("name") && b["name"].is_string() && b.contains("train_data") &&
                      b["train_data"].is_string(), "each of 'branches' must be {\"name\": str, \"train_data\": str}");
        c.branches.push_back({b["name"].get<std::string>(), b["train_data"].get<std::string>()});
      }
    }
    if (j.contains("branch_merge")) {
      const json& m = j["branch_merge"];
      c.branch_merge.method = m.value("method", c.branch_merge.method);
      c.branch_merge.density = m.value("density", c.branch_merge.density);
      c.branch_merge.lambda = m.value("lambda", c.branch_merge.lambda);
    }
    c.device = j.value("device", c.device);
  } catch (const json::exception& e) {
    MDL_FAIL("[train] '", source, "': ", e.what());
  } catch (const Error& e) {
    MDL_FAIL("[train] '", source, "': ", e.what());
  }
  MDL_CHECK(!c.model.empty(), "[train] '", source, "': field 'model' is required");
  if (!c.branches.empty()) {
    MDL_CHECK(c.modules.size() == 1, "[train] '", source, "': Branch-Train-Merge trains copies of one module; "
              "'modules' has ", c.modules.size(), " entries");
    validate(c.branch_merge, c.branches.size());
    return c;
  }
  MDL_CHECK(!c.train_data.empty(), "[train] '", source, "': field 'train_data' is required");
  if (c.train.empty())
    for (const auto& [name, m] : c.modules) c.train.push_back(name);
  MDL_CHECK(!c.train.empty() || c.options.train_base, "[train] '", source,
            "': nothing to train: add 'modules', list loaded ones in 'train', or set options.train_base");
  return c;
}

std::string train_config_help() {
  std::vector<std::pair<std::string, std::string>> fields;
  leaves(to_json_config(TrainConfig()), "", fields);
  std::string out;
  for (const auto& [path, def] : fields) {
    std::string what;
    for (const auto& [p, d] : descriptions())
      if (p == path) what = d;
    MDL_CHECK(!what.empty(), "[train] internal: field '", path, "' has no description");
    char buf[512];
    std::snprintf(buf, sizeof(buf), "%-32s %-14s %s\n", path.c_str(), def.c_str(), what.c_str());
    out += buf;
  }
  return out;
}

}  // namespace mdl
