// Which sites a module attaches to, written as PEFT users write it: `target_modules` as a list of name
// suffixes ("q_proj", "self_attn.v_proj") or "all-linear", or a regex that must match the whole site
// name; layers to transform; modules to exclude.
#pragma once

#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

#include "mdl/core/site.h"

namespace mdl {

template <class T>
class FieldList;

class ModelImpl;

/// Site selection.
struct TargetOptions {
  std::vector<std::string>
      target_modules;        ///< suffixes of site names; "all-linear" = every projection but the head
  std::string target_regex;  ///< full-match regex over site names (used when set)
  std::vector<int> layers_to_transform;      ///< only these blocks (empty: all)
  std::vector<std::string> exclude_modules;  ///< suffixes never targeted
};
void to_json(nlohmann::json& j, const TargetOptions& o);
void from_json(const nlohmann::json& j, TargetOptions& o);
/// The fields of TargetOptions (PEFT's keys): JSON keys, defaults and meanings (core/fields.h).
const FieldList<TargetOptions>& target_fields();

/// A regex that matches exactly these site names (dots escaped), "(?:a|b|...)".
std::string exact_sites_regex(const std::vector<std::string>& sites);

/// True if `name` equals `suffix` or ends with "." + suffix.
bool name_matches_suffix(const std::string& name, const std::string& suffix);

/// The sites of `model` of the given kind that `targets` select, in forward order; throws if none.
std::vector<std::shared_ptr<Site>> match_sites(const ModelImpl& model, const TargetOptions& targets,
                                               SiteKind kind);

}  // namespace mdl
