// The module-type table: every type's options survive module.json, every type that needs nothing but its
// options attaches on every architecture at sites of its kind (the architecture's declared defaults for
// LoRA and (IA)^3), and unknown types or stray options are refused naming what was expected.
#include "mdl/modules/module_type.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <set>

#include "backbones/fixtures.h"
#include "mdl/backbones/model.h"
#include "mdl/core/fields.h"
#include "mdl/modules/module_set.h"

namespace mdl {
namespace {

TEST(ModuleType, TheTableNamesEachTypeOnceWithAFactoryAndOptions) {
  std::set<std::string> seen;
  for (const auto& t : module_types()) {
    EXPECT_TRUE(seen.insert(t.name).second) << t.name << " twice";
    EXPECT_FALSE(t.summary.empty()) << t.name;
    EXPECT_TRUE(t.prepare && t.default_targets && t.options_to_json && t.options_from_json) << t.name;
    ASSERT_FALSE(t.formats.empty()) << t.name;
    EXPECT_EQ(t.formats.front(), "native") << t.name;
    EXPECT_EQ(&module_type(t.name), &t);
  }
  EXPECT_GE(seen.size(), 13u);
}

TEST(ModuleType, AnUnknownTypeIsRefusedListingTheKnownOnes) {
  for (const auto& t : module_types()) EXPECT_THROW_WITH(module_type("lorra"), "'lorra'", t.name.c_str());
  EXPECT_THROW_WITH(nlohmann::json({{"type", "lorra"}}).get<ModuleConfig>(), "unknown module type 'lorra'");
}

// Options written and read back equal what was set, for the types whose options hold something.
TEST(ModuleType, OptionsSurviveModuleJson) {
  ModuleConfig c;
  c.lora.r = 5;
  c.lora.alpha = 3;
  c.ia3.feedforward_modules = {"down_proj"};
  c.adapter.reduction_factor = 7;
  c.compacter.phm_dim = 2;
  c.sparse.density = 0.125;
  c.prompt.num_virtual_tokens = 3;
  c.prefix.num_virtual_tokens = 6;
  c.hyper.task_embedding_dim = 9;
  c.lora_moe.experts = 3;
  c.poly.num_skills = 5;
  c.fusion.members = {"a", "b"};
  for (const auto& t : module_types()) {
    c.type = t.name;
    const ModuleConfig back = nlohmann::json(c).get<ModuleConfig>();
    nlohmann::json want, got;
    t.options_to_json(c, want);
    t.options_to_json(back, got);
    EXPECT_EQ(got, want) << t.name;
    EXPECT_EQ(nlohmann::json(back), nlohmann::json(c)) << t.name;
  }
  EXPECT_EQ(nlohmann::json(c).get<ModuleConfig>().fusion.members, (std::vector<std::string>{"a", "b"}));
}

TEST(ModuleType, ATypeWithoutOptionsRefusesSome) {
  const nlohmann::json j = {{"type", "bitfit"}, {"options", {{"r", 8}}}};
  EXPECT_THROW_WITH(j.get<ModuleConfig>(), "bitfit module takes no options", "\"r\"");
  EXPECT_NO_THROW(
      (nlohmann::json{{"type", "bitfit"}, {"options", nlohmann::json::object()}}.get<ModuleConfig>()));
}

// A misspelt option or field is an error naming it and listing the real ones, for every type (the list
// is what the type's options write): it never falls back to the default silently.
TEST(ModuleType, AnUnknownOptionOrFieldIsRefusedNamingIt) {
  for (const auto& t : module_types()) {
    ModuleConfig c;
    c.type = t.name;
    nlohmann::json options;
    t.options_to_json(c, options);
    if (options.empty()) continue;  // option-less types: ATypeWithoutOptionsRefusesSome
    const std::string first = options.begin().key();
    nlohmann::json misspelt = options;
    misspelt[first + "x"] = misspelt[first];
    misspelt.erase(first);
    const std::string said = "no option '" + first + "x'";
    EXPECT_THROW_WITH((nlohmann::json{{"type", t.name}, {"options", misspelt}}.get<ModuleConfig>()),
                      said.c_str(), first.c_str());
  }
  EXPECT_THROW_WITH((nlohmann::json{{"type", "lora"}, {"options", {{"lora_alpah", 16}}}}.get<ModuleConfig>()),
                    "[lora] no option 'lora_alpah'", "lora_alpha");
  EXPECT_THROW_WITH(
      (nlohmann::json{{"type", "lora"}, {"target", {{"target_modules", {"q_proj"}}}}}.get<ModuleConfig>()),
      "no field 'target'", "targets");
  EXPECT_THROW_WITH((nlohmann::json{{"type", "lora"}, {"options", 3}}.get<ModuleConfig>()),
                    "must be a JSON object");
}

// Each type's options are described key by key, with the defaults it writes: the help, the JSON and
// the unknown-key check come from one field list.
TEST(ModuleType, EveryOptionIsDescribedWithTheDefaultItWrites) {
  for (const auto& t : module_types()) {
    ModuleConfig c;
    c.type = t.name;
    nlohmann::json options;
    t.options_to_json(c, options);
    const std::vector<FieldHelp> help = t.options_help();
    std::vector<std::string> described;
    for (const auto& h : help) {
      EXPECT_FALSE(h.help.empty()) << t.name << "." << h.key;
      described.push_back(h.key.substr(0, h.key.find('.')));  // a nested router's fields under "router."
    }
    described.erase(std::unique(described.begin(), described.end()), described.end());
    std::vector<std::string> written;
    for (const auto& item : options.items()) written.push_back(item.key());
    std::sort(described.begin(), described.end());
    EXPECT_EQ(described, written) << t.name;  // nlohmann's objects list keys sorted
    for (const auto& h : help)
      if (h.key.find('.') == std::string::npos) {
        EXPECT_EQ(h.fallback, options[h.key].dump()) << t.name << "." << h.key;
      }
  }
}

// Every type that needs nothing but its options, on every architecture: it lands on sites of its kind,
// and LoRA and (IA)^3 on the projections the architecture declares.
TEST(ModuleType, EveryStandaloneTypeAttachesAtSitesOfItsKind) {
  for (const std::string arch : {"gpt2", "llama", "bert"}) {
    ModuleSet set(load_model(test::tiny_checkpoint(arch)));
    const ArchTargets declared = arch_targets(set.model()->config().arch);
    for (const auto& t : module_types()) {
      if (!t.needs.empty()) continue;
      bool has_kind = false;
      for (const auto& site : set.model()->sites()) has_kind |= site->info().kind == t.site_kind;
      if (!has_kind) continue;  // e.g. no attention_kv site: refused by match_sites, tested there
      ModuleConfig c;
      c.type = t.name;
      SCOPED_TRACE(arch + " " + t.name);
      ASSERT_NO_THROW(set.add(t.name, c));
      ASSERT_FALSE(set.sites(t.name).empty());
      for (const auto& s : set.sites(t.name)) {
        EXPECT_EQ(set.model()->site(s).info().kind, t.site_kind) << s;
        const auto& want = t.name == "lora"  ? declared.attention
                           : t.name == "ia3" ? declared.ia3
                                             : std::vector<std::string>{};
        if (want.empty()) continue;
        bool matched = false;
        for (const auto& suffix : want) matched |= name_matches_suffix(s, suffix);
        for (const auto& suffix : t.name == "ia3" ? declared.ia3_exclude : std::vector<std::string>{})
          EXPECT_FALSE(name_matches_suffix(s, suffix)) << s << " is excluded";
        EXPECT_TRUE(matched) << s << " is not among the declared targets";
      }
    }
  }
}

TEST(ModuleType, SparseAndFusionSayWhatTheyNeed) {
  ModuleSet set(load_model(test::tiny_checkpoint("llama")));
  ModuleConfig sparse;
  sparse.type = "sparse";
  EXPECT_THROW_WITH(set.add("s", sparse), "sparse module 's' has no selection");
  EXPECT_FALSE(module_type("sparse").needs.empty());
  EXPECT_FALSE(module_type("fusion").needs.empty());
  EXPECT_TRUE(module_type("fusion").on_members_sites);
}

}  // namespace
}  // namespace mdl
