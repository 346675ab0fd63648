// The named modules attached to one backbone. A module (e.g. a task's LoRA) spans many sites; each site
// gets its part, held in the site's AttachedModules. Modules are added, activated, scaled, merged and
// saved by name; the backbone's own parameters are frozen and never modified except by an explicit merge.
//
// Native files (native_format.h): `module.json` (type, options, targets, the sites it covers, a fingerprint
// of the base model) + `module.safetensors` ("<site>.<parameter>" -> tensor).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "mdl/backbones/model.h"
#include "mdl/modules/bitfit.h"
#include "mdl/modules/bottleneck_adapter.h"
#include "mdl/modules/compacter.h"
#include "mdl/modules/fusion.h"
#include "mdl/modules/hyper_lora.h"
#include "mdl/modules/ia3.h"
#include "mdl/modules/layer_copy.h"
#include "mdl/modules/lora.h"
#include "mdl/modules/lora_mixture.h"
#include "mdl/modules/poly_lora.h"
#include "mdl/modules/prefix_tuning.h"
#include "mdl/modules/prompt_tuning.h"
#include "mdl/modules/sparse_diff.h"
#include "mdl/modules/targets.h"

namespace mdl {

/// Everything that defines a module before training: its type, its type's options and where it goes.
struct ModuleConfig {
  std::string type = "lora";  ///< a name in module_types() (module_type.h)
  LoraOptions lora;
  Ia3Options ia3;
  AdapterOptions adapter;
  SparseOptions sparse;
  PromptTuningOptions prompt;
  PrefixTuningOptions prefix;
  CompacterOptions compacter;
  HyperLoraOptions hyper;
  LoraMixtureOptions lora_moe;
  PolyLoraOptions poly;
  FusionOptions fusion;   ///< fusion: its members (loaded first); sites = those every member covers
  TargetOptions targets;  ///< default per type when empty (LoRA: q_proj, v_proj and their GPT-2/BERT names)
  uint64_t seed = 0;      ///< initialisation seed
  /// the class (or tag) names the module was trained with, in index order (id2label); written by training,
  /// read by mdl eval and the server; empty for modules of other tasks
  std::vector<std::string> labels;
  /// PEFT's modules_to_save: linear sites (names or their last components, e.g. "score", "classifier")
  /// that get a trainable full copy of their projection (layer_copy.h), saved with the module and used in
  /// the base's place while it runs; a site named here gets the copy only, not the type's part. The
  /// trainer adds the head of a new classification task here (a head the checkpoint did not have).
  std::vector<std::string> modules_to_save;
};
void to_json(nlohmann::json& j, const ModuleConfig& c);
void from_json(const nlohmann::json& j, ModuleConfig& c);

/// Which base model a module was made for.
struct BaseFingerprint {
  std::string architecture;
  int64_t hidden_size = 0, n_layer = 0, vocab_size = 0;
  std::string shapes_hash;  ///< hash of the targeted sites' names and shapes
  bool operator==(const BaseFingerprint& o) const;
};

/// Trainable parameter summary.
struct ParameterSummary {
  int64_t trainable = 0;
  int64_t total = 0;  ///< backbone + all modules
  double percent() const { return total ? 100.0 * trainable / total : 0.0; }
  std::string to_string() const;
};

/// Named modules on one model.
/// A module directory read into memory and not attached to anything yet (ModuleSet::read).
struct ModuleFiles {
  std::string dir;
  std::string format;  ///< "native", "peft" or "adapterhub"
  ModuleConfig config;
  std::vector<std::string> sites;             ///< where its parts go
  std::map<std::string, at::Tensor> tensors;  ///< "<site>.<parameter>" -> tensor
  BaseFingerprint made_for;                   ///< native: the base it was saved from (else empty)
};

class ModuleSet {
 public:
  explicit ModuleSet(Model model);
  /// Detaches this set's modules from the model's sites (what they merged into base weights stays merged).
  ~ModuleSet();
  ModuleSet(const ModuleSet&) = delete;
  ModuleSet& operator=(const ModuleSet&) = delete;
  /// The modules (and their attachments) move to the new set; the old one holds none.
  ModuleSet(ModuleSet&& other) noexcept;
  ModuleSet& operator=(ModuleSet&&) = delete;
  Model model() const { return model_; }

  /// Creates module `name` at the sites its targets select; throws if the name is taken. A sparse module
  /// takes, per site, either "<site>.indices" or selection scores "<site>" (change_scores, fisher_scores)
  /// from `init`.
  void add(const std::string& name, const ModuleConfig& config,
           const std::map<std::string, at::Tensor>& init = {});
  void remove(const std::string& name);
  bool contains(const std::string& name) const { return modules_.count(name) > 0; }
  std::vector<std::string> names() const;
  const ModuleConfig& config(const std::string& name) const;
  /// Module `name`'s part at `site`.
  std::shared_ptr<SiteModule> module_at(const std::string& name, const std::string& site) const;
  /// Sites module `name` covers, in forward order.
  std::vector<std::string> sites(const std::string& name) const;

  /// Turns a module on or off for every later forward.
  void set_active(const std::string& name, bool active);
  /// Scales a module's effect (1 = as trained).
  void set_scale(const std::string& name, double scale);
  /// Records the class names module `name` is trained on (saved with it: ModuleConfig::labels).
  void set_labels(const std::string& name, const std::vector<std::string>& labels);
  /// The labels of the modules `names` (empty: every module), which must agree; empty if none has any.
  std::vector<std::string> labels(const std::vector<std::string>& names = {}) const;

  /// Parameters and buffers of `name` as "<site>.<param>" -> tensor (shared with the module, not copies).
  std::map<std::string, at::Tensor> tensors(const std::string& name) const;
  /// Rounds module `name`'s floating tensors, in place, to the nearest values `dtype` holds (they keep
  /// their own dtype): what a server storing the module in `dtype` computes with, on every path.
  void round_tensors(const std::string& name, at::ScalarType dtype);
  /// Copies tensors into module `name`, checking every name and shape.
  void load_tensors(const std::string& name, const std::map<std::string, at::Tensor>& tensors,
                    const std::string& source);
  /// Parameters to optimise for `names` (empty: every module).
  std::vector<at::Tensor> parameters(const std::vector<std::string>& names = {}) const;
  /// Freezes the backbone and makes the named modules (empty: all) trainable, the others frozen.
  void freeze_base(const std::vector<std::string>& trainable = {});
  /// How every site stores the LoRAs that mixed batches gather (AttachedModules::set_lora_bank_storage):
  /// float32 (default) or float16; sites that get modules later take it too.
  void set_lora_bank_storage(at::ScalarType storage);
  /// Trainable / total parameters right now.
  ParameterSummary summary() const;

  /// Folds `name` into the base weights (LoRA, DoRA, (IA)^3, BitFit); reversible with unmerge.
  void merge(const std::string& name);
  void unmerge(const std::string& name);
  bool merged(const std::string& name) const;
  /// Folds a training-time reparameterisation away (prefix tuning's MLP): same outputs, fewer parameters.
  void fold(const std::string& name);
  /// Hypernetwork modules: use learned task `task`, or an explicit task embedding (a new task).
  void set_task(const std::string& name, int64_t task);
  void set_task_embedding(const std::string& name, const at::Tensor& embedding);
  /// Writes what hypernetwork module `name` generates for its current task as a plain LoRA module
  /// `lora_name`.
  void materialize(const std::string& name, const std::string& lora_name);

  /// The fingerprint of this model for the sites `name` covers.
  BaseFingerprint fingerprint(const std::string& name) const;
  /// Writes `name` to `dir` (atomically, the files of one module or none) in `format`: "native", "peft" or
  /// "adapterhub" (those the module's type can be written as: ModuleType::formats).
  void save(const std::string& name, const std::string& dir, const std::string& format = "native") const;
  /// Loads a module directory (native, or PEFT `adapter_config.json`) as `name` (default: the directory's
  /// name): attach(read(dir)). A module for another base model is refused naming the site and shapes; a
  /// fingerprint mismatch with matching shapes is a warning (silenced by `force`).
  std::string load(const std::string& dir, const std::string& name = "", bool force = false);
  /// Reads a module directory's files for this set's model without changing the set or the model (it only
  /// reads the model's configuration and site names): what a server does off its lock.
  ModuleFiles read(const std::string& dir) const;
  /// Attaches what read() returned as `name` (default: the directory's name); returns the name.
  std::string attach(const ModuleFiles& files, const std::string& name = "", bool force = false);

 private:
  struct Part {
    std::string site;
    std::shared_ptr<SiteModule> module;
  };
  struct Named {
    ModuleConfig config;
    std::vector<Part> parts;
    bool merged = false;
  };
  const Named& get(const std::string& name) const;
  Named& get_mutable(const std::string& name);
  std::shared_ptr<HyperGeneratorImpl> hyper_generator(const std::string& name) const;
  /// add() at exactly these sites (from a file), each checked to exist and to be of the right kind.
  void add_exact(const std::string& name, const ModuleConfig& config, const std::vector<std::string>& sites,
                 const std::map<std::string, at::Tensor>& init = {});
  AttachedModules& attached(const std::string& site);
  /// The linear sites `modules_to_save` names, in forward order; throws naming an entry that names none.
  std::vector<std::shared_ptr<Site>> copy_sites(const std::string& name,
                                                const std::vector<std::string>& modules_to_save) const;
  /// The sites every member of a fusion covers, in forward order (members checked: loaded, fusable).
  std::vector<std::shared_ptr<Site>> fusion_sites(const std::string& name, const FusionOptions& o) const;
  Model model_;
  at::ScalarType lora_bank_storage_ = at::kFloat;
  std::map<std::string, Named> modules_;
  std::vector<std::string> order_;
};

/// Module names are directory names: 1 to 200 bytes of valid UTF-8 (any script, spaces allowed), no '/',
/// no control characters, not starting with '.'; throws naming the rule broken.
void check_module_name(const std::string& name);

/// The file format of a module directory: "native" (module.json), "peft" or "adapterhub"
/// (adapter_config.json), or "" when it holds no module (or those names are not regular files).
std::string module_format(const std::string& dir);

}  // namespace mdl
