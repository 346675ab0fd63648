#include "mdl/modules/targets.h"

#include <re2/re2.h>

#include <algorithm>
#include <nlohmann/json.hpp>

#include "mdl/backbones/model.h"
#include "mdl/core/error.h"
#include "mdl/core/fields.h"

namespace mdl {

const FieldList<TargetOptions>& target_fields() {
  using T = TargetOptions;
  static const FieldList<T> f =
      FieldList<T>("targets")
          .add(
              "target_modules", [](nlohmann::json& v, const T& o) { v = o.target_modules; },
              [](const nlohmann::json& v, T& o) {
                if (v.is_string()) {  // PEFT: "all-linear", or a regex over the full name
                  const std::string s = v.get<std::string>();
                  if (s == "all-linear")
                    o.target_modules = {s};
                  else
                    o.target_regex = s;
                } else if (v.is_array()) {
                  o.target_modules = v.get<std::vector<std::string>>();
                }
              },
              "suffixes of site names (q_proj), \"all-linear\" (every projection but the head), or a regex "
              "string")
          .add(
              "target_regex",
              [](nlohmann::json& v, const T& o) {
                v = o.target_regex.empty() ? nlohmann::json(nlohmann::json::value_t::discarded)
                                           : nlohmann::json(o.target_regex);
              },
              [](const nlohmann::json& v, T& o) {
                if (v.is_string()) o.target_regex = v.get<std::string>();
              },
              "a full-match regex over site names (used when set)")
          .add(
              "exclude_modules", [](nlohmann::json& v, const T& o) { v = o.exclude_modules; },
              [](const nlohmann::json& v, T& o) {
                if (v.is_array()) o.exclude_modules = v.get<std::vector<std::string>>();
              },
              "suffixes never targeted")
          .add(
              "layers_to_transform", [](nlohmann::json& v, const T& o) { v = o.layers_to_transform; },
              [](const nlohmann::json& v, T& o) {
                if (v.is_number_integer())
                  o.layers_to_transform = {v.get<int>()};
                else if (!v.is_null())
                  o.layers_to_transform = v.get<std::vector<int>>();
              },
              "only these blocks (empty: all)");
  return f;
}

void to_json(nlohmann::json& j, const TargetOptions& o) {
  j = target_fields().write(o);
}

void from_json(const nlohmann::json& j, TargetOptions& o) {
  o = target_fields().read(j);
}

std::string exact_sites_regex(const std::vector<std::string>& sites) {
  std::string regex;
  for (const auto& s : sites) regex += (regex.empty() ? "" : "|") + RE2::QuoteMeta(s);
  return "(?:" + regex + ")";
}

bool name_matches_suffix(const std::string& name, const std::string& suffix) {
  return name == suffix || (name.size() > suffix.size() &&
                            name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0 &&
                            name[name.size() - suffix.size() - 1] == '.');
}

std::vector<std::shared_ptr<Site>> match_sites(const ModelImpl& model, const TargetOptions& t,
                                               SiteKind kind) {
  std::unique_ptr<RE2> regex;
  if (!t.target_regex.empty()) {
    regex = std::make_unique<RE2>(t.target_regex, RE2::Quiet);
    MDL_CHECK(regex->ok(), "[targets] target_modules regex '", t.target_regex,
              "' does not compile: ", regex->error());
  }
  const bool all_linear =
      std::find(t.target_modules.begin(), t.target_modules.end(), "all-linear") != t.target_modules.end();
  std::vector<std::shared_ptr<Site>> out;
  for (const auto& site : model.sites()) {
    const SiteInfo& info = site->info();
    if (info.kind != kind) continue;
    bool hit = false;
    if (regex)
      hit = RE2::FullMatch(info.name, *regex);
    else if (all_linear)
      hit = kind == SiteKind::linear && info.layer >= 0;
    else
      for (const auto& s : t.target_modules) hit = hit || name_matches_suffix(info.name, s);
    if (!hit) continue;
    bool excluded = false;
    for (const auto& s : t.exclude_modules) excluded = excluded || name_matches_suffix(info.name, s);
    if (excluded) continue;
    if (!t.layers_to_transform.empty() &&
        std::find(t.layers_to_transform.begin(), t.layers_to_transform.end(), info.layer) ==
            t.layers_to_transform.end())
      continue;
    out.push_back(site);
  }
  if (out.empty()) {
    std::string some;
    int n = 0;
    for (const auto& s : model.sites())
      if (s->info().kind == kind && n++ < 6) some += (some.empty() ? "" : ", ") + s->name();
    std::string wanted = regex ? "regex '" + t.target_regex + "'" : "";
    for (const auto& s : t.target_modules) wanted += (wanted.empty() ? "" : ", ") + s;
    MDL_FAIL("[targets] no site of ", model.config().architecture, " matches ",
             wanted.empty() ? "(nothing given)" : wanted, "; sites of this kind look like: ", some);
  }
  return out;
}

}  // namespace mdl
