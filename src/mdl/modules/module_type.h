// The module types mdl knows, one entry each: its name, the kind of site it attaches to, whether its
// change adds to the site's output, the files it can be written as, its default targets, its options in
// JSON and its factory. ModuleSet, composition, the formats and the CLI read this table instead of
// switching on type names; a new type is one entry in module_type.cpp.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "mdl/core/fields.h"
#include "mdl/core/site.h"
#include "mdl/io/model_config.h"
#include "mdl/modules/targets.h"

namespace mdl {

class ModelImpl;
class SiteModule;
struct ModuleConfig;

/// What a type's factory is given when one module is added.
struct ModuleBuild {
  ModelImpl& model;
  const std::string& name;                          ///< the module's name (for errors)
  const ModuleConfig& config;                       ///< targets already resolved
  const std::map<std::string, at::Tensor>& init;    ///< per-site initial values some types need (sparse)
  const std::vector<std::shared_ptr<Site>>& sites;  ///< the sites it covers, in forward order
  at::TensorOptions options;                        ///< the model's dtype and device
  /// A loaded module's part at a site (what fusion combines).
  std::function<std::shared_ptr<SiteModule>(const std::string& module, const std::string& site)> member_at;
};

/// Makes the module's part at `site`, the `part`-th of its sites. State the parts share (a hypernetwork,
/// a prefix encoder, Compacter's PHM rules, a shared skill allocation) lives in the closure, which may
/// refer to the ModuleBuild and seed it was prepared from: call it only while they live (inside add).
using PartFactory = std::function<std::shared_ptr<SiteModule>(const Site& site, size_t part)>;

/// One module type.
struct ModuleType {
  std::string name;
  std::string summary;  ///< one line for --help
  SiteKind site_kind = SiteKind::linear;
  bool on_members_sites = false;  ///< attaches where its members are (fusion), whatever their kind
  /// Its change adds to the site's output (a delta on the projection), so a sum of such modules is a sum
  /// of changes and one can be scaled inside a merge's span; a sequential module (adapters, prompts)
  /// transforms the output instead.
  bool additive = false;
  std::vector<std::string> formats;  ///< files it can be written as: "native" always; "peft", "adapterhub"
  std::string needs;                 ///< what it needs besides its options to be made (empty: nothing)
  /// Its default targets on an architecture (which declares its projections' names: arch_targets).
  std::function<TargetOptions(Arch arch, const ModuleConfig& config)> default_targets;
  /// Its options in and out of JSON (the "options" field of module.json).
  std::function<void(const ModuleConfig& config, nlohmann::json& options)> options_to_json;
  std::function<void(const nlohmann::json& options, ModuleConfig& config)> options_from_json;
  /// Its options' keys, defaults and meanings (`mdl init-module --type T --help-options`).
  std::function<std::vector<FieldHelp>()> options_help;
  /// How many tasks a module of this type routes between (its options.num_tasks), or -1 when it does not
  /// route by task; unset: -1. A trainer refuses data with more tasks before the first step.
  std::function<int64_t(const ModuleConfig& config)> tasks_known;
  /// For moving a module to a model of other widths (transfer-module's prune-align): one character per
  /// axis of its parameter `parameter` at `site`, 'i' where the axis runs along the site's input features,
  /// 'o' along its output features, '-' along neither (a rank, a bottleneck). Unset: the type's parameters
  /// are not per-site tensors along the features (a prefix encoder, a hypernetwork), and it is not moved
  /// between widths.
  std::function<std::string(const ModuleConfig& config, const std::string& site,
                            const std::string& parameter)>
      feature_axes;
  /// Its options for a model of hidden size `to` that keep the sizes they gave at hidden size `from` (an
  /// adapter's bottleneck), throwing when none can; unset: the options stay as they are.
  std::function<void(ModuleConfig& config, int64_t from, int64_t to)> options_for_width;
  /// Prepares the parts of one module; `seed` is advanced by what it draws.
  std::function<PartFactory(const ModuleBuild& build, uint64_t& seed)> prepare;
};

/// Every module type, in the order --help lists them.
const std::vector<ModuleType>& module_types();
/// The type called `name`; throws naming the known types.
const ModuleType& module_type(const std::string& name);
/// The known types' names joined by `separator` ("lora, ia3, ...").
std::string module_type_names(const std::string& separator = ", ");

}  // namespace mdl
