#include "mdl/modules/module_set.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/core/hash.h"
#include "mdl/core/log.h"
#include "mdl/modules/adapterhub_format.h"
#include "mdl/modules/module_type.h"
#include "mdl/modules/native_format.h"
#include "mdl/modules/peft_format.h"
#include "mdl/tokenizers/unicode.h"

namespace fs = std::filesystem;

namespace mdl {

void to_json(nlohmann::json& j, const ModuleConfig& c) {
  j = {{"type", c.type}, {"targets", c.targets}, {"seed", c.seed}};
  module_type(c.type).options_to_json(c, j["options"]);
  // Only where there are: other modules' files unchanged.
  if (!c.labels.empty()) j["labels"] = c.labels;
  if (!c.modules_to_save.empty()) j["modules_to_save"] = c.modules_to_save;
}

void from_json(const nlohmann::json& j, ModuleConfig& c) {
  c = ModuleConfig();
  MDL_CHECK(j.is_object() && j.contains("type") && j["type"].is_string(),
            "[module] config needs a string field 'type'");
  static const nlohmann::json written = ModuleConfig();  // the fields, as to_json lists them
  for (const auto& item : j.items())
    if (!written.contains(item.key()) && item.key() != "labels" && item.key() != "modules_to_save") {
      std::string known;
      for (const auto& k : written.items()) known += (known.empty() ? "" : ", ") + k.key();
      known += ", labels, modules_to_save";
      MDL_FAIL("[module] a module config has no field '", item.key().substr(0, 100), "'; its fields are ",
               known);
    }
  c.type = j["type"].get<std::string>();
  module_type(c.type).options_from_json(j.value("options", nlohmann::json::object()), c);
  if (j.contains("targets")) c.targets = j["targets"].get<TargetOptions>();
  c.seed = j.value("seed", static_cast<uint64_t>(0));
  if (j.contains("labels")) {
    MDL_CHECK(j["labels"].is_array() && std::all_of(j["labels"].begin(), j["labels"].end(),
                                                    [](const nlohmann::json& v) { return v.is_string(); }),
              "[module] field 'labels' must be an array of label names, found ",
              j["labels"].dump().substr(0, 80));
    c.labels = j["labels"].get<std::vector<std::string>>();
  }
  if (j.contains("modules_to_save")) {
    MDL_CHECK(j["modules_to_save"].is_array() &&
                  std::all_of(j["modules_to_save"].begin(), j["modules_to_save"].end(),
                              [](const nlohmann::json& v) { return v.is_string(); }),
              "[module] field 'modules_to_save' must be an array of layer names (e.g. [\"score\"]), found ",
              j["modules_to_save"].dump().substr(0, 80));
    c.modules_to_save = j["modules_to_save"].get<std::vector<std::string>>();
  }
}

bool BaseFingerprint::operator==(const BaseFingerprint& o) const {
  return architecture == o.architecture && hidden_size == o.hidden_size && n_layer == o.n_layer &&
         vocab_size == o.vocab_size && shapes_hash == o.shapes_hash;
}

std::string ParameterSummary::to_string() const {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "trainable params: %lld || all params: %lld || trainable%%: %.4f",
                static_cast<long long>(trainable), static_cast<long long>(total), percent());
  return buf;
}

void check_module_name(const std::string& name) {
  const char* broken = name.empty()                          ? "it is empty"
                       : name.size() > 200                   ? "it is over 200 bytes"
                       : unicode::valid_utf8(name) != name   ? "it is not valid UTF-8"
                       : name[0] == '.'                      ? "it starts with '.'"
                       : name.find('/') != std::string::npos ? "it has a '/'"
                       : std::any_of(name.begin(), name.end(),
                                     [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7F; })
                           ? "it has a control character"
                           : nullptr;
  MDL_CHECK(broken == nullptr, "[modules] invalid module name '", unicode::valid_utf8(name.substr(0, 200)),
            "': ", broken,
            "; a name is a directory name (letters of any script, digits, spaces, '_', '-', '.')");
}

std::string module_format(const std::string& dir) {
  // Regular files only (a FIFO or a device named module.json is no module), and no exception for an
  // entry that cannot be read (a symlink loop).
  const fs::path path(dir);
  std::error_code ec;
  if (fs::is_regular_file(path / "module.json", ec)) return "native";
  if (fs::is_regular_file(path / "adapter_config.json", ec))
    return is_adapterhub_dir(dir) ? "adapterhub" : "peft";
  return "";
}

ModuleSet::ModuleSet(Model model) : model_(std::move(model)) {}

ModuleSet::Named& ModuleSet::get_mutable(const std::string& name) {
  return const_cast<Named&>(static_cast<const ModuleSet*>(this)->get(name));
}

const ModuleSet::Named& ModuleSet::get(const std::string& name) const {
  auto it = modules_.find(name);
  if (it == modules_.end()) {
    std::string known;
    for (const auto& n : order_) known += (known.empty() ? "" : ", ") + n;
    MDL_FAIL("[modules] no module named '", name, "'",
             known.empty() ? "; none is loaded" : "; loaded: " + known);
  }
  return it->second;
}

std::vector<std::shared_ptr<Site>> ModuleSet::fusion_sites(const std::string& name,
                                                           const FusionOptions& o) const {
  for (const auto& member : o.members) {
    const Named& m = get(member);  // throws naming the loaded modules if absent
    MDL_CHECK(member != name, "[modules] fusion '", name, "' cannot fuse itself");
    MDL_CHECK(!m.merged, "[modules] cannot fuse '", member,
              "': it is merged into the base weights; unmerge it first");
    MDL_CHECK(m.config.type != "prompt" && m.config.type != "prefix", "[modules] cannot fuse '", member,
              "', a ", m.config.type,
              " module: it prepends positions and has no output for fusion to attend over");
  }
  std::vector<std::shared_ptr<Site>> out;
  for (const auto& site : model_->sites()) {
    bool all = true;
    for (const auto& member : o.members) {
      const auto& parts = get(member).parts;
      all = all &&
            std::any_of(parts.begin(), parts.end(), [&](const Part& p) { return p.site == site->name(); });
    }
    if (all) out.push_back(site);
  }
  MDL_CHECK(!out.empty(), "[modules] fusion '", name,
            "': its members share no site, so there is nothing to fuse");
  return out;
}

std::vector<std::shared_ptr<Site>> ModuleSet::copy_sites(
    const std::string& name, const std::vector<std::string>& modules_to_save) const {
  std::vector<std::shared_ptr<Site>> out;  // in forward order
  for (const auto& s : model_->sites())
    if (s->info().kind == SiteKind::linear &&
        std::any_of(modules_to_save.begin(), modules_to_save.end(),
                    [&](const std::string& m) { return name_matches_suffix(s->name(), m); }))
      out.push_back(s);
  for (const auto& entry : modules_to_save) {
    if (std::any_of(out.begin(), out.end(),
                    [&](const auto& s) { return name_matches_suffix(s->name(), entry); }))
      continue;
    std::string heads;
    for (const auto& s : model_->sites())
      if (s->info().kind == SiteKind::linear && s->info().layer < 0)
        heads += (heads.empty() ? "" : ", ") + s->name();
    MDL_FAIL("[modules] module '", name, "': modules_to_save names '", entry, "', which is no projection of ",
             model_->config().architecture, "; its projections outside the blocks are: ", heads);
  }
  return out;
}

AttachedModules& ModuleSet::attached(const std::string& site_name) {
  Site& site = model_->site(site_name);
  if (site.empty()) {
    auto fresh = std::make_shared<AttachedModules>();
    fresh->set_lora_bank_storage(lora_bank_storage_);
    site.attach(fresh);
  }
  auto attached = std::dynamic_pointer_cast<AttachedModules>(site.function());
  MDL_CHECK(attached != nullptr, "[modules] site '", site_name,
            "' already holds a function that is not a module list");
  return *attached;
}

void ModuleSet::set_lora_bank_storage(at::ScalarType storage) {
  MDL_CHECK(storage == at::kFloat || storage == at::kHalf,
            "[modules] the LoRA bank stores float32 or float16, got ", storage);
  lora_bank_storage_ = storage;
  for (const auto& site : model_->sites())
    if (auto a = std::dynamic_pointer_cast<AttachedModules>(site->function()))
      a->set_lora_bank_storage(storage);
}

void ModuleSet::add(const std::string& name, const ModuleConfig& config_in,
                    const std::map<std::string, at::Tensor>& init) {
  check_module_name(name);
  MDL_CHECK(!contains(name), "[modules] a module named '", name,
            "' already exists; remove it first or pick another name");
  ModuleConfig config = config_in;
  const ModuleType& type = module_type(config.type);
  const bool no_targets = config.targets.target_modules.empty() && config.targets.target_regex.empty();
  if (no_targets) {
    TargetOptions defaults = type.default_targets(model_->config().arch, config);
    defaults.layers_to_transform = config.targets.layers_to_transform;
    defaults.exclude_modules.insert(defaults.exclude_modules.end(), config.targets.exclude_modules.begin(),
                                    config.targets.exclude_modules.end());
    config.targets = defaults;
  }
  const auto copies = copy_sites(name, config.modules_to_save);
  auto selected = type.on_members_sites ? fusion_sites(name, config.fusion)
                                        : match_sites(*model_, config.targets, type.site_kind);
  selected.erase(
      std::remove_if(selected.begin(), selected.end(),
                     [&](const auto& s) { return std::count(copies.begin(), copies.end(), s) > 0; }),
      selected.end());  // a copied layer is the copy's alone
  Named named;
  named.config = config;
  uint64_t seed = config.seed;
  const ModuleBuild build{*model_,
                          name,
                          config,
                          init,
                          selected,
                          at::TensorOptions().dtype(model_->dtype()).device(model_->device()),
                          [this](const std::string& m, const std::string& s) { return module_at(m, s); }};
  const PartFactory make = type.prepare(build, seed);  // used only here: it refers to build and seed
  for (size_t i = 0; i < selected.size(); ++i)
    named.parts.push_back({selected[i]->name(), make(*selected[i], i)});
  for (const auto& site : copies)
    named.parts.push_back({site->name(), std::make_shared<LayerCopyImpl>(model_->linear(site->name()))});
  for (const auto& p : named.parts) {
    p.module->train(model_->is_training());  // a module attached to a model in eval mode evaluates too
    attached(p.site).entries().push_back({name, p.module, true, false, 1.0});
  }
  modules_[name] = std::move(named);
  order_.push_back(name);
}

ModuleSet::ModuleSet(ModuleSet&& other) noexcept
    : model_(other.model_),
      lora_bank_storage_(other.lora_bank_storage_),
      modules_(std::move(other.modules_)),
      order_(std::move(other.order_)) {
  other.modules_.clear(), other.order_.clear();
}

ModuleSet::~ModuleSet() {
  // Every part this set attached leaves its site; the site is bare again when nothing else is there.
  for (const auto& [name, n] : modules_)
    for (const auto& p : n.parts) {
      Site* site = model_->find_site(p.site);
      auto* attached = site ? dynamic_cast<AttachedModules*>(site->function().get()) : nullptr;
      if (attached == nullptr) continue;
      auto& entries = attached->entries();
      entries.erase(std::remove_if(entries.begin(), entries.end(),
                                   [&, &name = name](const auto& e) { return e.name == name; }),
                    entries.end());
      if (entries.empty()) site->attach(nullptr);
    }
}

void ModuleSet::remove(const std::string& name) {
  Named& n = get_mutable(name);
  for (const auto& other : order_) {
    const ModuleConfig& c = modules_.at(other).config;
    MDL_CHECK(!module_type(c.type).on_members_sites ||
                  std::find(c.fusion.members.begin(), c.fusion.members.end(), name) == c.fusion.members.end(),
              "[modules] '", name, "' is fused by '", other, "'; remove '", other, "' first");
  }
  if (n.merged) unmerge(name);
  for (const auto& p : n.parts) {
    auto& entries = attached(p.site).entries();
    entries.erase(
        std::remove_if(entries.begin(), entries.end(), [&](const auto& e) { return e.name == name; }),
        entries.end());
    if (entries.empty()) model_->site(p.site).attach(nullptr);
  }
  modules_.erase(name);
  order_.erase(std::remove(order_.begin(), order_.end(), name), order_.end());
}

std::vector<std::string> ModuleSet::names() const {
  return order_;
}
const ModuleConfig& ModuleSet::config(const std::string& name) const {
  return get(name).config;
}

std::shared_ptr<SiteModule> ModuleSet::module_at(const std::string& name, const std::string& site) const {
  for (const auto& p : get(name).parts)
    if (p.site == site) return p.module;
  MDL_FAIL("[modules] module '", name, "' has no part at '", site, "'");
}

std::vector<std::string> ModuleSet::sites(const std::string& name) const {
  std::vector<std::string> out;
  for (const auto& p : get(name).parts) out.push_back(p.site);
  return out;
}

void ModuleSet::set_active(const std::string& name, bool active) {
  for (const auto& p : get(name).parts) attached(p.site).find(name)->active = active;
}

void ModuleSet::set_labels(const std::string& name, const std::vector<std::string>& labels) {
  get_mutable(name).config.labels = labels;
}

std::vector<std::string> ModuleSet::labels(const std::vector<std::string>& names) const {
  std::vector<std::string> out;
  std::string from;
  for (const auto& name : names.empty() ? order_ : names) {
    const auto& l = get(name).config.labels;
    if (l.empty()) continue;
    MDL_CHECK(out.empty() || out == l, "[modules] '", from, "' and '", name,
              "' were trained with different labels; use one of them (or modules of one task) at a time");
    out = l, from = name;
  }
  return out;
}

void ModuleSet::set_scale(const std::string& name, double scale) {
  MDL_CHECK(!get(name).merged, "[modules] '", name,
            "' is merged into the base weights; unmerge it before rescaling");
  for (const auto& p : get(name).parts) attached(p.site).find(name)->scale = scale;
}

std::map<std::string, at::Tensor> ModuleSet::tensors(const std::string& name) const {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : get(name).parts) {
    for (const auto& item : p.module->named_parameters(/*recurse=*/true))
      out[p.site + "." + item.key()] = item.value();
    for (const auto& item : p.module->named_buffers(/*recurse=*/true))
      out[p.site + "." + item.key()] = item.value();
  }
  return out;
}

void ModuleSet::round_tensors(const std::string& name, at::ScalarType dtype) {
  torch::NoGradGuard g;
  for (auto& [key, t] : tensors(name))
    if (at::isFloatingType(t.scalar_type()) && t.scalar_type() != dtype) t.copy_(t.to(dtype));
}

void ModuleSet::load_tensors(const std::string& name, const std::map<std::string, at::Tensor>& tensors,
                             const std::string& source) {
  torch::NoGradGuard g;
  auto mine = this->tensors(name);
  for (auto& [key, param] : mine) {
    auto it = tensors.find(key);
    MDL_CHECK(it != tensors.end(), "[modules] '", source, "' has no tensor for '", key, "' (expected shape ",
              param.sizes(), ")");
    MDL_CHECK(it->second.sizes() == param.sizes(), "[modules] '", source, "': tensor '", key, "' has shape ",
              it->second.sizes(), " but the site in this model needs ", param.sizes(),
              "; a module for another base model?");
    MDL_CHECK(it->second.scalar_type() == param.scalar_type() ||
                  at::isFloatingType(it->second.scalar_type()) == at::isFloatingType(param.scalar_type()),
              "[modules] '", source, "': tensor '", key, "' is ", it->second.scalar_type(),
              " but this parameter is ", param.scalar_type(),
              "; a module's weights are floating point (its indices integers)");
    if (at::isFloatingType(it->second.scalar_type())) {
      const int64_t bad = it->second.numel() - at::isfinite(it->second).sum().item<int64_t>();
      MDL_CHECK(bad == 0, "[modules] '", source, "': tensor '", key, "' has ", bad,
                " values that are NaN or infinite; a corrupt or diverged module");
    }
    param.copy_(it->second);
  }
  for (const auto& [key, t] : tensors)
    MDL_CHECK(mine.count(key), "[modules] '", source, "': tensor '", key, "' belongs to no site of module '",
              name, "'; a module for another base model?");
}

std::vector<at::Tensor> ModuleSet::parameters(const std::vector<std::string>& names) const {
  std::vector<at::Tensor> out;
  for (const auto& n : names.empty() ? order_ : names)
    for (const auto& p : get(n).parts)
      for (const auto& t : p.module->parameters()) out.push_back(t);
  return out;
}

void ModuleSet::freeze_base(const std::vector<std::string>& trainable) {
  for (auto& p : model_->parameters()) p.set_requires_grad(false);
  for (const auto& n : order_)
    for (const auto& p : get(n).parts)
      for (auto& t : p.module->parameters()) t.set_requires_grad(false);
  for (auto& t : parameters(trainable)) t.set_requires_grad(true);
}

ParameterSummary ModuleSet::summary() const {
  ParameterSummary s;
  for (const auto& p : model_->parameters()) {
    s.total += p.numel();
    if (p.requires_grad()) s.trainable += p.numel();
  }
  for (const auto& t : parameters()) {
    s.total += t.numel();
    if (t.requires_grad()) s.trainable += t.numel();
  }
  return s;
}

void ModuleSet::merge(const std::string& name) {
  Named& n = get_mutable(name);
  MDL_CHECK(!n.merged, "[modules] '", name, "' is already merged");
  for (const auto& p : n.parts)  // all or nothing: check every part first
    MDL_CHECK(p.module->can_merge(), "[merge] module '", name, "' (", p.module->type(), ") at '", p.site,
              "' cannot be merged into the base weights; only LoRA (incl. DoRA), (IA)^3 and BitFit on biased "
              "projections can");
  for (const auto& p : n.parts) {
    auto* e = attached(p.site).find(name);
    MDL_CHECK(e->scale == 1.0, "[modules] '", name, "' has scale ", e->scale, "; merge works on scale 1");
    p.module->merge();
    e->merged = true;
  }
  n.merged = true;
}

void ModuleSet::unmerge(const std::string& name) {
  Named& n = get_mutable(name);
  MDL_CHECK(n.merged, "[modules] '", name, "' is not merged");
  for (auto it = n.parts.rbegin(); it != n.parts.rend(); ++it) {
    it->module->unmerge();
    attached(it->site).find(name)->merged = false;
  }
  n.merged = false;
}

bool ModuleSet::merged(const std::string& name) const {
  return get(name).merged;
}

std::shared_ptr<HyperGeneratorImpl> ModuleSet::hyper_generator(const std::string& name) const {
  auto h = std::dynamic_pointer_cast<HyperLoraImpl>(get(name).parts.front().module);
  MDL_CHECK(h != nullptr, "[modules] '", name, "' is not a hypernetwork (hyper_lora) module");
  return h->generator();
}

void ModuleSet::set_task(const std::string& name, int64_t task) {
  hyper_generator(name)->set_task(task);
}

void ModuleSet::set_task_embedding(const std::string& name, const at::Tensor& embedding) {
  hyper_generator(name)->set_task_embedding(embedding);
}

void ModuleSet::materialize(const std::string& name, const std::string& lora_name) {
  const Named& n = get(name);
  auto generator = hyper_generator(name);
  ModuleConfig lora;
  lora.type = "lora";
  lora.lora.r = n.config.hyper.r;
  lora.lora.alpha = n.config.hyper.alpha;
  std::vector<std::string> site_names;
  std::map<std::string, at::Tensor> tensors;
  torch::NoGradGuard g;
  const at::Tensor task = generator->current_task();
  for (const auto& p : n.parts) {
    auto part = std::dynamic_pointer_cast<HyperLoraImpl>(p.module);
    auto [A, B] = generator->generate(task, part->index());
    site_names.push_back(p.site);
    tensors[p.site + ".lora_A"] = A.detach().clone();
    tensors[p.site + ".lora_B"] = B.detach().clone();
  }
  add_exact(lora_name, lora, site_names);
  load_tensors(lora_name, tensors, "hypernetwork '" + name + "'");
}

void ModuleSet::fold(const std::string& name) {
  Named& n = get_mutable(name);
  MDL_CHECK(n.config.type == "prefix", "[modules] '", name, "' is a ", n.config.type,
            " module; only prefix tuning has a reparameterisation to fold");
  auto first = std::dynamic_pointer_cast<PrefixTuningImpl>(n.parts.front().module);
  const auto& old = first->encoder();
  if (!old->projection) return;
  PrefixTuningOptions o = n.config.prefix;
  o.prefix_projection = false;
  auto folded = std::make_shared<PrefixEncoderImpl>(old->n, old->n_layer, model_->config().hidden_size,
                                                    old->kv_dim, o, 0, old->embedding.options());
  {
    torch::NoGradGuard g;
    folded->embedding.copy_(old->all());
  }
  folded->embedding.set_requires_grad(old->embedding.requires_grad());
  for (auto& p : n.parts) std::dynamic_pointer_cast<PrefixTuningImpl>(p.module)->set_encoder(folded);
  n.config.prefix = o;
}

BaseFingerprint ModuleSet::fingerprint(const std::string& name) const {
  const ModelConfig& c = model_->config();
  BaseFingerprint f{c.architecture, c.hidden_size, c.n_layer, c.vocab_size, ""};
  uint64_t h = kFnvOffset;  // over "site:in:out;"
  for (const auto& p : get(name).parts) {
    const SiteInfo& info = model_->site(p.site).info();
    h = fnv1a(
        info.name + ":" + std::to_string(info.in_features) + ":" + std::to_string(info.out_features) + ";",
        h);
  }
  char buf[20];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
  f.shapes_hash = buf;
  return f;
}

void ModuleSet::save(const std::string& name, const std::string& dir, const std::string& format) const {
  if (format == "peft")
    write_peft(*this, name, dir);
  else if (format == "adapterhub")
    write_adapterhub(*this, name, dir);
  else if (format == "native")
    write_native(*this, name, dir);
  else
    MDL_FAIL("[modules] format '", format, "' is unknown; expected native, peft or adapterhub");
}

std::string ModuleSet::load(const std::string& dir, const std::string& name, bool force) {
  return attach(read(dir), name, force);
}

ModuleFiles ModuleSet::read(const std::string& dir) const {
  const fs::path path(dir);
  MDL_CHECK(fs::is_directory(path), "[modules] '", dir, "' is not a directory");
  ModuleFiles f;
  f.dir = dir;
  f.format = module_format(dir);
  if (f.format == "peft" || f.format == "adapterhub") {
    PeftModule peft = f.format == "adapterhub" ? read_adapterhub(dir, *model_) : read_peft(dir, *model_);
    f.config = std::move(peft.config);
    f.sites = std::move(peft.sites);
    f.tensors = std::move(peft.tensors);
    return f;
  }
  MDL_CHECK(f.format == "native", "[modules] '", dir,
            "' has neither module.json (mdl) nor adapter_config.json (PEFT or AdapterHub)");
  return read_native(dir);
}

std::string ModuleSet::attach(const ModuleFiles& f, const std::string& name_in, bool force) {
  std::string name = name_in.empty() ? fs::path(f.dir).lexically_normal().filename().string() : name_in;
  if (name.empty()) name = fs::path(f.dir).lexically_normal().parent_path().filename().string();
  const std::string source = f.format == "native" ? (fs::path(f.dir) / "module.safetensors").string() : f.dir;
  add_exact(name, f.config, f.sites, f.format == "native" ? f.tensors : std::map<std::string, at::Tensor>{});
  try {
    load_tensors(name, f.tensors, source);
  } catch (...) {
    remove(name);
    throw;
  }
  if (f.format != "native") return name;
  const BaseFingerprint mine = fingerprint(name);
  const BaseFingerprint& theirs = f.made_for;
  if (!(mine == theirs) && !force)
    log_warn("[modules] '" + f.dir + "' was made for " + theirs.architecture + " (hidden " +
             std::to_string(theirs.hidden_size) + ", " + std::to_string(theirs.n_layer) + " layers, vocab " +
             std::to_string(theirs.vocab_size) + "), this model is " + mine.architecture + " (hidden " +
             std::to_string(mine.hidden_size) + ", " + std::to_string(mine.n_layer) + " layers, vocab " +
             std::to_string(mine.vocab_size) + "); shapes fit, so it is loaded (--force silences this)");
  return name;
}

void ModuleSet::add_exact(const std::string& name, const ModuleConfig& config_in,
                          const std::vector<std::string>& site_names,
                          const std::map<std::string, at::Tensor>& init) {
  MDL_CHECK(!site_names.empty(), "[modules] module '", name, "' covers no site");
  const ModuleType& type = module_type(config_in.type);
  std::vector<std::string> own;  // the type's sites; the others are copies (modules_to_save)
  for (const auto& s : site_names) {
    MDL_CHECK(model_->find_site(s) != nullptr, "[modules] module '", name, "' needs site '", s, "', which ",
              model_->config().architecture, " does not have; a module for another base model?");
    const bool copy = std::any_of(config_in.modules_to_save.begin(), config_in.modules_to_save.end(),
                                  [&](const std::string& m) { return name_matches_suffix(s, m); });
    if (copy) continue;
    MDL_CHECK(type.on_members_sites || model_->site(s).info().kind == type.site_kind, "[modules] module '",
              name, "': site '", s, "' is not of the kind a ", config_in.type, " module attaches to");
    own.push_back(s);
  }
  MDL_CHECK(!own.empty(), "[modules] module '", name, "' has parts only at its modules_to_save sites; a ",
            config_in.type, " module needs at least one site of its own");
  ModuleConfig config = config_in;
  // Exact sites: a regex of their names, so add() selects exactly these.
  config.targets = TargetOptions();
  config.targets.target_regex = exact_sites_regex(own);
  add(name, config, init);
  modules_[name].config.targets = config_in.targets;  // keep what the user wrote
}

}  // namespace mdl
