#include "mdl/modules/module_type.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "mdl/backbones/model.h"
#include "mdl/core/error.h"
#include "mdl/core/fields.h"
#include "mdl/modules/layernorm_tuning.h"
#include "mdl/modules/module_set.h"

namespace mdl {
namespace {

/// JSON in and out of one options field of ModuleConfig, by the options' field list (which refuses a
/// key it does not know, naming it and the known ones) and the list's help.
template <typename Options, Options ModuleConfig::*field, const FieldList<Options>& (*fields)()>
void options_entry(ModuleType& t) {
  t.options_to_json = [](const ModuleConfig& c, nlohmann::json& j) { j = fields().write(c.*field); };
  t.options_from_json = [](const nlohmann::json& j, ModuleConfig& c) { c.*field = fields().read(j); };
  t.options_help = [] { return fields().help(); };
}

/// A type without options: "options" is written as {} and must be an object when read.
void no_options(ModuleType& t) {
  t.options_to_json = [](const ModuleConfig&, nlohmann::json& j) { j = nlohmann::json::object(); };
  t.options_from_json = [](const nlohmann::json& j, ModuleConfig& c) {
    MDL_CHECK(j.is_object() && j.empty(), "[module] a ", c.type, " module takes no options; found ",
              j.dump().substr(0, 200));
  };
  t.options_help = [] { return std::vector<FieldHelp>(); };
}

TargetOptions suffixes(std::vector<std::string> names, std::vector<std::string> exclude = {}) {
  TargetOptions t;
  t.target_modules = std::move(names);
  t.exclude_modules = std::move(exclude);
  return t;
}
TargetOptions regex(std::string r) {
  TargetOptions t;
  t.target_regex = std::move(r);
  return t;
}
TargetOptions attention_targets(Arch arch, const ModuleConfig&) {
  return suffixes(arch_targets(arch).attention);
}
TargetOptions every_linear(Arch, const ModuleConfig&) {
  return suffixes({"all-linear"});
}
TargetOptions every_site(Arch, const ModuleConfig&) {
  return regex(".*");
}  // every site of the type's kind
/// Sublayer sites: attention ("attn", "self_attn", "attention") and MLP ("mlp", BERT's "output",
/// ModuleFormer's "mlpf"); the Pfeiffer configuration takes the MLP's only.
TargetOptions sublayers(const std::string& config) {
  return regex(config == "houlsby" ? R"(.*\.(attn|self_attn|attention|mlp|mlpf|output))"
                                   : R"(.*\.(mlp|mlpf|output))");
}

/// The axes of a parameter by its name, from a table; a name the table lacks is an error naming the known.
std::string axes_of(const std::string& type, const std::string& parameter,
                    const std::vector<std::pair<std::string, std::string>>& table) {
  std::string known;
  for (const auto& [name, axes] : table) {
    if (name == parameter) return axes;
    known += (known.empty() ? "" : ", ") + name;
  }
  MDL_FAIL("[module] a ", type, " module has no parameter '", parameter, "'; expected one of ", known);
}

std::vector<ModuleType> make_types() {
  std::vector<ModuleType> types;
  auto add = [&](std::string name, std::string summary, SiteKind kind, bool additive,
                 std::vector<std::string> formats) -> ModuleType& {
    ModuleType t;
    t.name = std::move(name);
    t.summary = std::move(summary);
    t.site_kind = kind;
    t.additive = additive;
    t.formats = std::move(formats);
    types.push_back(std::move(t));
    return types.back();
  };

  {
    ModuleType& t = add("lora", "low-rank update of a projection (DoRA, rsLoRA, PiSSA, rank patterns)",
                        SiteKind::linear, true, {"native", "peft", "adapterhub"});
    options_entry<LoraOptions, &ModuleConfig::lora, &lora_fields>(t);
    t.default_targets = attention_targets;
    t.feature_axes = [](const ModuleConfig&, const std::string&, const std::string& p) {
      return axes_of(
          "lora", p,
          {{"lora_A", "-i"}, {"lora_B", "o-"}, {"lora_bias", "o"}, {"lora_magnitude_vector", "o"}});
    };
    t.prepare = [](const ModuleBuild& b, uint64_t& seed) -> PartFactory {
      return [&b, &seed](const Site& site, size_t) {
        return std::make_shared<LoraImpl>(b.model.linear(site.name()), b.config.lora, seed++);
      };
    };
  }
  {
    ModuleType& t = add("ia3", "(IA)^3: learned rescaling of a projection's output or input",
                        SiteKind::linear, false, {"native", "peft"});
    options_entry<Ia3Options, &ModuleConfig::ia3, &ia3_fields>(t);
    t.feature_axes = [](const ModuleConfig& c, const std::string& site, const std::string& p) {
      return axes_of("ia3", p, {{"ia3_l", c.ia3.is_feedforward(site) ? "-i" : "o-"}});
    };
    t.default_targets = [](Arch arch, const ModuleConfig&) {
      const ArchTargets a = arch_targets(arch);
      return suffixes(a.ia3, a.ia3_exclude);
    };
    t.prepare = [](const ModuleBuild& b, uint64_t& seed) -> PartFactory {
      return [&b, &seed](const Site& site, size_t) {
        return std::make_shared<Ia3Impl>(b.model.linear(site.name()), b.config.ia3, seed++);
      };
    };
  }
  {
    ModuleType& t = add("adapter", "bottleneck adapter after a sublayer (Houlsby, Pfeiffer, parallel)",
                        SiteKind::sublayer, false, {"native", "adapterhub"});
    options_entry<AdapterOptions, &ModuleConfig::adapter, &adapter_fields>(t);
    t.default_targets = [](Arch, const ModuleConfig& c) { return sublayers(c.adapter.config); };
    // A parallel adapter reads the sublayer's input; the others its output. Both write the output.
    t.feature_axes = [](const ModuleConfig& c, const std::string&, const std::string& p) {
      const std::string read = c.adapter.config == "parallel" ? "i" : "o";
      return axes_of("adapter", p,
                     {{"adapter_down.0.weight", "-" + read},
                      {"adapter_down.0.bias", "-"},
                      {"adapter_up.weight", "o-"},
                      {"adapter_up.bias", "o"},
                      {"adapter_norm_before.weight", read},
                      {"adapter_norm_before.bias", read}});
    };
    // The bottleneck (hidden / reduction_factor) stays what it was.
    t.options_for_width = [](ModuleConfig& c, int64_t from, int64_t to) {
      const int64_t bottleneck = std::max<int64_t>(1, from / c.adapter.reduction_factor);
      MDL_CHECK(to % bottleneck == 0, "[adapter] the bottleneck ", bottleneck, " (hidden ", from,
                " / reduction_factor ", c.adapter.reduction_factor, ") is no whole fraction of hidden size ",
                to, ", so no reduction_factor keeps it there");
      c.adapter.reduction_factor = to / bottleneck;
    };
    t.prepare = [](const ModuleBuild& b, uint64_t& seed) -> PartFactory {
      return [&b, &seed](const Site& site, size_t) {
        return std::make_shared<BottleneckAdapterImpl>(site.info(), b.config.adapter, seed++, b.options);
      };
    };
  }
  {
    ModuleType& t = add("compacter", "adapter with Kronecker-factored (PHM) weights shared across layers",
                        SiteKind::sublayer, false, {"native"});
    options_entry<CompacterOptions, &ModuleConfig::compacter, &compacter_fields>(t);
    t.default_targets = [](Arch, const ModuleConfig& c) { return sublayers(c.compacter.config); };
    t.prepare = [](const ModuleBuild& b, uint64_t& seed) -> PartFactory {
      auto rules = std::make_shared<PhmRulesImpl>(b.config.compacter.phm_dim, seed, b.options);
      return [&b, &seed, rules](const Site& site, size_t part) {
        return std::make_shared<CompacterImpl>(site.info(), b.config.compacter, rules, part == 0, seed++,
                                               b.options);
      };
    };
  }
  {
    ModuleType& t = add("bitfit", "trains a projection's bias only", SiteKind::linear, true, {"native"});
    no_options(t);
    t.feature_axes = [](const ModuleConfig&, const std::string&, const std::string& p) {
      return axes_of("bitfit", p, {{"bias", "o"}});
    };
    t.default_targets = every_linear;
    t.prepare = [](const ModuleBuild& b, uint64_t&) -> PartFactory {
      return [&b](const Site& site, size_t) {
        return std::make_shared<BiasDeltaImpl>(b.model.linear(site.name()));
      };
    };
  }
  {
    ModuleType& t = add("layernorm", "trains the norms' gains and biases", SiteKind::norm, false, {"native"});
    no_options(t);
    t.feature_axes = [](const ModuleConfig&, const std::string&, const std::string& p) {
      return axes_of("layernorm", p, {{"weight", "o"}, {"bias", "o"}});
    };
    t.default_targets = every_site;
    t.prepare = [](const ModuleBuild& b, uint64_t&) -> PartFactory {
      return [&b](const Site& site, size_t) {
        return std::make_shared<LayerNormTuningImpl>(b.model.norm(site.name()));
      };
    };
  }
  {
    ModuleType& t =
        add("sparse", "sparse fine-tuning: a diff on a selected fraction of a projection's weights",
            SiteKind::linear, true, {"native"});
    t.needs =
        "a selection per site (scores from a dense warm-up or Fisher information, or indices): mdl train "
        "makes it";
    options_entry<SparseOptions, &ModuleConfig::sparse, &sparse_fields>(t);
    t.default_targets = every_linear;
    t.prepare = [](const ModuleBuild& b, uint64_t&) -> PartFactory {
      return [&b](const Site& site, size_t) {
        at::Tensor indices;
        if (auto it = b.init.find(site.name() + ".indices"); it != b.init.end())
          indices = it->second;
        else if (auto sc = b.init.find(site.name()); sc != b.init.end())
          indices = select_top_indices(sc->second, b.config.sparse.density);
        else
          MDL_FAIL("[modules] sparse module '", b.name, "' has no selection for '", site.name(),
                   "'; pass scores from change_scores (dense warm-up) or fisher_scores, or indices");
        return std::make_shared<SparseDiffImpl>(b.model.linear(site.name()), indices.to(at::kLong));
      };
    };
  }
  {
    ModuleType& t = add("prompt", "prompt tuning: virtual tokens before the input", SiteKind::embedding,
                        false, {"native", "peft"});
    options_entry<PromptTuningOptions, &ModuleConfig::prompt, &prompt_fields>(t);
    t.default_targets = every_site;
    t.prepare = [](const ModuleBuild& b, uint64_t& seed) -> PartFactory {
      return [&b, &seed](const Site& site, size_t) {
        return std::make_shared<PromptTuningImpl>(site.info(), b.config.prompt, b.model.token_embeddings(),
                                                  seed++);
      };
    };
  }
  {
    ModuleType& t = add("prefix", "prefix tuning: virtual keys and values in every attention layer",
                        SiteKind::attention_kv, false, {"native", "peft"});
    options_entry<PrefixTuningOptions, &ModuleConfig::prefix, &prefix_fields>(t);
    t.default_targets = every_site;
    t.prepare = [](const ModuleBuild& b, uint64_t& seed) -> PartFactory {
      const ModelConfig& mc = b.model.config();
      auto encoder =
          std::make_shared<PrefixEncoderImpl>(b.config.prefix.num_virtual_tokens, mc.n_layer, mc.hidden_size,
                                              mc.n_kv_head * mc.head_dim, b.config.prefix, seed, b.options);
      return [encoder, head_dim = mc.head_dim](const Site& site, size_t part) {
        return std::make_shared<PrefixTuningImpl>(site.info(), head_dim, encoder, part == 0);
      };
    };
  }
  {
    ModuleType& t = add("hyper_lora", "LoRA generated per task by a shared hypernetwork (HyperFormer-style)",
                        SiteKind::linear, true, {"native"});
    options_entry<HyperLoraOptions, &ModuleConfig::hyper, &hyper_lora_fields>(t);
    t.default_targets = attention_targets;
    t.prepare = [](const ModuleBuild& b, uint64_t& seed) -> PartFactory {
      std::vector<SiteInfo> infos;
      for (const auto& site : b.sites) infos.push_back(site->info());
      auto hyper = std::make_shared<HyperGeneratorImpl>(b.config.hyper, infos, seed, b.options);
      return [hyper](const Site& site, size_t part) {
        return std::make_shared<HyperLoraImpl>(site.info(), static_cast<int64_t>(part), hyper, part == 0);
      };
    };
  }
  {
    ModuleType& t = add("lora_moe", "a mixture of LoRA experts behind a learned router (MoLoRA, SMEAR)",
                        SiteKind::linear, true, {"native"});
    options_entry<LoraMixtureOptions, &ModuleConfig::lora_moe, &lora_moe_fields>(t);
    t.default_targets = attention_targets;
    t.tasks_known = [](const ModuleConfig& c) -> int64_t {
      return c.lora_moe.router.level == "task" ? c.lora_moe.num_tasks : -1;
    };
    t.prepare = [](const ModuleBuild& b, uint64_t& seed) -> PartFactory {
      return [&b, &seed](const Site& site, size_t) {
        return std::make_shared<LoraMixtureImpl>(site.info(), b.config.lora_moe, seed++, b.options);
      };
    };
  }
  {
    ModuleType& t = add("poly_lora", "Polytropon: LoRA skills combined by a learned task-skill allocation",
                        SiteKind::linear, true, {"native"});
    options_entry<PolyLoraOptions, &ModuleConfig::poly, &poly_lora_fields>(t);
    t.default_targets = attention_targets;
    t.tasks_known = [](const ModuleConfig& c) -> int64_t { return c.poly.num_tasks; };
    t.prepare = [](const ModuleBuild& b, uint64_t& seed) -> PartFactory {
      std::shared_ptr<SkillAllocationImpl> shared;
      if (b.config.poly.shared_allocation)
        shared = std::make_shared<SkillAllocationImpl>(allocation_options(b.config.poly), seed++, b.options);
      return [&b, &seed, shared](const Site& site, size_t part) {
        auto allocation = shared ? shared
                                 : std::make_shared<SkillAllocationImpl>(allocation_options(b.config.poly),
                                                                         seed++, b.options);
        return std::make_shared<PolyLoraImpl>(site.info(), b.config.poly, allocation, !shared || part == 0,
                                              seed++, b.options);
      };
    };
  }
  {
    ModuleType& t = add("fusion", "AdapterFusion: attention, a gate or a mixture over loaded modules",
                        SiteKind::linear, false, {"native"});
    t.on_members_sites = true;
    t.needs = "its member modules, loaded first";
    options_entry<FusionOptions, &ModuleConfig::fusion, &fusion_fields>(t);
    t.default_targets = [](Arch, const ModuleConfig&) { return TargetOptions(); };  // its members' sites
    t.prepare = [](const ModuleBuild& b, uint64_t& seed) -> PartFactory {
      return [&b, &seed](const Site& site, size_t) {
        std::vector<std::shared_ptr<SiteModule>> members;
        for (const auto& member : b.config.fusion.members)
          members.push_back(b.member_at(member, site.name()));
        return std::make_shared<FusionImpl>(site.info(), b.config.fusion, members, seed++, b.options);
      };
    };
  }
  return types;
}

}  // namespace

const std::vector<ModuleType>& module_types() {
  static const std::vector<ModuleType> types = make_types();
  return types;
}

std::string module_type_names(const std::string& separator) {
  std::string out;
  for (const auto& t : module_types()) out += (out.empty() ? "" : separator) + t.name;
  return out;
}

const ModuleType& module_type(const std::string& name) {
  for (const auto& t : module_types())
    if (t.name == name) return t;
  MDL_FAIL("[module] unknown module type '", name.substr(0, 200), "'; expected one of ", module_type_names());
}

}  // namespace mdl
