#include "mdl/training/train_config.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/core/fields.h"
#include "mdl/io/json_file.h"

namespace mdl {
namespace {

using nlohmann::json;

const FieldList<DatasetOptions>& data_fields() {
  using D = DatasetOptions;
  static const FieldList<D> f =
      FieldList<D>("data")
          .add("kind", &D::kind, "classification | tagging | instruction | text")
          .add("on_bad_record", &D::on_bad_record,
               "fail | skip (skipped records are counted and warned about)")
          .add("max_length", &D::max_length, "longer examples are truncated to this many tokens")
          .add("labels", &D::labels, "label names in index order; empty: collected in order of appearance");
  return f;
}

const FieldList<MergeOptions>& branch_merge_fields() {
  using M = MergeOptions;
  static const FieldList<M> f =
      FieldList<M>("branch_merge")
          .add("method", &M::method,
               "how the branches merge: linear | task_arithmetic | ties | dare_linear | dare_ties | ...")
          .add("density", &M::density, "ties / dare: fraction of entries kept")
          .add("lambda", &M::lambda, "scale of the merged task vector");
  return f;
}

const FieldList<TrainConfig>& train_config_fields() {
  using C = TrainConfig;
  static const FieldList<C> f =
      FieldList<C>("train")
          .add("model", &C::model, "checkpoint directory (Hugging Face layout) of the frozen backbone")
          .add(
              "modules",
              [](json& v, const C& c) {
                v = json::object();
                for (const auto& [k, m] : c.modules) v[k] = m;
              },
              [](const json& v, C& c) {
                MDL_CHECK(v.is_object(), "field 'modules' must be an object {\"name\": {module config}}");
                for (const auto& [name, m] : v.items()) c.modules[name] = m.get<ModuleConfig>();
              },
              "new modules by name: {\"name\": {\"type\": \"lora\", \"options\": {...}, \"targets\": {...}, "
              "\"modules_to_save\": [\"score\"]}}; modules_to_save: layers trained whole with the module and "
              "saved in it (default: a head the checkpoint lacks)")
          .add("load", &C::load, "existing module directories to load first (mdl, PEFT, AdapterHub)")
          .add("train", &C::train, "names of the modules to train; default: every module under 'modules'")
          .add("train_data", &C::train_data, "JSONL training file")
          .add("eval_data", &C::eval_data, "JSONL evaluation file (optional)")
          .add("data", &C::data, data_fields(), "how to read both files")
          .add("options", &C::options, train_options_fields(), "steps, batch, schedule, output...")
          .add("resume", &C::resume, "continue from <out_dir>/checkpoint when it exists")
          .add(
              "branches",
              [](json& v, const C& c) {
                v = json::array();
                for (const auto& b : c.branches)
                  v.push_back({{"name", b.name}, {"train_data", b.train_data}});
              },
              [](const json& v, C& c) {
                MDL_CHECK(v.is_array(), "field 'branches' must be an array of {\"name\", \"train_data\"}");
                for (const auto& b : v) {
                  MDL_CHECK(b.is_object() && b.contains("name") && b["name"].is_string() &&
                                b.contains("train_data") && b["train_data"].is_string(),
                            "each of 'branches' must be {\"name\": str, \"train_data\": str}");
                  c.branches.push_back({b["name"].get<std::string>(), b["train_data"].get<std::string>()});
                }
              },
              "Branch-Train-Merge: [{\"name\", \"train_data\"}, ...], each trains the one 'modules' entry on "
              "its data")
          .add("branch_merge", &C::branch_merge, branch_merge_fields(), "how the branches merge")
          .add("device", &C::device, "cpu | cuda | cuda:N");
  return f;
}

}  // namespace

TrainConfig parse_train_config(const std::string& text, const std::string& source) {
  json j = io::parse_json(text, source);
  MDL_CHECK(j.is_object(), "[train] '", source, "' must hold a JSON object");
  const std::vector<std::string> known = train_config_fields().keys();
  for (const auto& [k, v] : j.items())
    MDL_CHECK(std::find(known.begin(), known.end(), k) != known.end(), "[train] '", source,
              "': unknown field '", k, "'; see mdl train --help-config");
  // The schedule's decay ends with the run unless the config says otherwise.
  if (j.contains("options") && j["options"].is_object() &&
      (!j["options"].contains("schedule") || !j["options"]["schedule"].is_object() ||
       !j["options"]["schedule"].contains("total_steps")))
    j["options"]["schedule"]["total_steps"] = j["options"].value("steps", TrainOptions().steps);
  if (!j.contains("options")) j["options"] = {{"schedule", {{"total_steps", TrainOptions().steps}}}};
  TrainConfig c;
  try {
    c = train_config_fields().read(j);
  } catch (const json::exception& e) {
    MDL_FAIL("[train] '", source, "': ", e.what());
  } catch (const Error& e) {
    MDL_FAIL("[train] '", source, "': ", e.what());
  }
  MDL_CHECK(!c.model.empty(), "[train] '", source, "': field 'model' is required");
  if (!c.branches.empty()) {
    MDL_CHECK(c.modules.size() == 1, "[train] '", source,
              "': Branch-Train-Merge trains copies of one module; "
              "'modules' has ",
              c.modules.size(), " entries");
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

ModuleConfig with_new_heads(ModuleConfig module, const ModelImpl& model) {
  if (!module.modules_to_save.empty()) return module;
  for (const auto& p : model.initialised_parameters()) {
    const size_t dot = p.rfind('.');
    const std::string layer = p.substr(0, dot);
    const Site* site = model.find_site(layer);
    if (dot == std::string::npos || site == nullptr || site->info().kind != SiteKind::linear) continue;
    if (std::find(module.modules_to_save.begin(), module.modules_to_save.end(), layer) ==
        module.modules_to_save.end())
      module.modules_to_save.push_back(layer);
  }
  return module;
}

std::string train_config_help() {
  return format_help(train_config_fields().help());
}

}  // namespace mdl
