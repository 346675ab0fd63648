// `mdl train --config run.json`: one JSON document for a run (model, modules, data, schedule, output).
// Every field has a default and a description; `mdl train --help-config` prints them all.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "mdl/aggregation/merge_methods.h"
#include "mdl/modules/module_set.h"
#include "mdl/training/dataset.h"
#include "mdl/training/trainer.h"

namespace mdl {

/// One branch of Branch-Train-Merge: the module template trained on this data alone.
struct TrainBranch {
  std::string name;        ///< the branch's module name (a directory name)
  std::string train_data;  ///< its JSONL file
};

/// A training run.
struct TrainConfig {
  std::string model;                            ///< checkpoint directory (Hugging Face layout)
  std::map<std::string, ModuleConfig> modules;  ///< new modules to create and train, by name
  std::vector<std::string> load;   ///< existing module directories to load (frozen unless listed in train)
  std::vector<std::string> train;  ///< names of the modules to train (default: every new module)
  std::string train_data;          ///< JSONL file
  std::string eval_data;           ///< JSONL file (optional)
  DatasetOptions data;             ///< how to read both files
  TrainOptions options;            ///< steps, batch, schedule, output...
  bool resume = true;              ///< continue from <out_dir>/checkpoint when it exists
  /// Branch-Train-Merge: each branch trains a copy of the one module under `modules` on its own data,
  /// ranks taking branches in turn with no gradient exchange; then rank 0 merges them into
  /// <out_dir>/modules/merged with `branch_merge`.
  std::vector<TrainBranch> branches;
  MergeOptions branch_merge;  ///< method, density, lambda of the branches' merge
  std::string device = "cpu";
};

/// Parses a config; unknown top-level fields and bad values are errors naming the field and the file.
TrainConfig parse_train_config(const std::string& json_text, const std::string& source);

/// `module` to be trained on `model` with the layers the checkpoint lacked (a new task's classification
/// head, initialised at load) added to its modules_to_save, so they are trained and saved with it, as PEFT
/// does for a sequence-classification task; unchanged when modules_to_save is already given or nothing
/// was initialised.
ModuleConfig with_new_heads(ModuleConfig module, const ModelImpl& model);

/// Every field as "path  default  description" lines.
std::string train_config_help();

}  // namespace mdl
