// An options struct's fields, declared once: each field's JSON key, where it lives in the struct and what
// it means. The one list writes the struct (every field), reads it (the keys present, over the struct's
// defaults; a key the list does not know is refused, naming it and the known ones, unless the caller
// reads a foreign format that carries more, like PEFT's adapter_config.json; a value of the wrong type
// names its key), checks it (the struct's validate) and describes it (key, default, meaning: `mdl train
// --help-config`, `mdl init-module
// --help-options`, and the `--option KEY=VALUE` flags checked against it).
//
//   const FieldList<SparseOptions>& sparse_fields() {
//     static const auto f = FieldList<SparseOptions>("sparse")
//         .add("density", &SparseOptions::density, "fraction of each weight's entries trained")
//         .check([](const SparseOptions& o) { validate(o); });
//     return f;
//   }
#pragma once

#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "mdl/core/error.h"

namespace mdl {

/// Whether reading refuses keys the list does not know.
enum class UnknownKeys { refuse, ignore };

/// One line of a field list's description.
struct FieldHelp {
  std::string key;       ///< dotted path ("schedule.lr")
  std::string fallback;  ///< the default, as JSON
  std::string help;
};

template <class T>
class FieldList {
 public:
  using Write = std::function<void(nlohmann::json& value, const T& o)>;
  using Read = std::function<void(const nlohmann::json& value, T& o)>;

  /// `where` prefixes errors ("[lora] ...").
  explicit FieldList(std::string where) : where_(std::move(where)) {}

  /// A field stored as its member's own JSON (numbers, strings, lists, maps, nested structs with
  /// to_json/from_json).
  template <class V>
  FieldList& add(std::string key, V T::*member, std::string help) {
    return add(
        std::move(key), [member](nlohmann::json& v, const T& o) { v = o.*member; },
        [member](const nlohmann::json& v, T& o) { o.*member = v.get<V>(); }, std::move(help));
  }
  /// A nested struct with a field list of its own: written and read (and checked) by that list, and
  /// described field by field under "key.".
  template <class V>
  FieldList& add(std::string key, V T::*member, const FieldList<V>& nested, std::string help) {
    add(
        std::move(key), [member, &nested](nlohmann::json& v, const T& o) { v = nested.write(o.*member); },
        [member, &nested](const nlohmann::json& v, T& o) { o.*member = nested.read(v); }, std::move(help));
    fields_.back().nested = [&nested](const std::string& prefix) { return nested.help(prefix); };
    return *this;
  }
  /// A field whose JSON differs from its member's (PEFT's init_lora_weights: true, false or a name).
  FieldList& add(std::string key, Write write, Read read, std::string help) {
    fields_.push_back({std::move(key), std::move(help), std::move(write), std::move(read), nullptr});
    return *this;
  }

  /// Runs after every read: range and enum checks that name the field (validate(o)).
  FieldList& check(std::function<void(const T&)> check) {
    check_ = std::move(check);
    return *this;
  }

  /// Every field of `o`.
  nlohmann::json write(const T& o) const {
    nlohmann::json j = nlohmann::json::object();
    for (const auto& f : fields_) {
      nlohmann::json v;
      f.write(v, o);
      if (!v.is_discarded())
        j[f.key] = std::move(v);  // a writer may leave a field out (PEFT has no such key)
    }
    return j;
  }
  /// The fields present in `j` over T's defaults.
  T read(const nlohmann::json& j, UnknownKeys unknown = UnknownKeys::refuse) const {
    MDL_CHECK(j.is_object(), "[", where_, "] options must be a JSON object, got ", j.type_name());
    if (unknown == UnknownKeys::refuse)
      for (const auto& item : j.items())
        MDL_CHECK(find(item.key()) != nullptr, "[", where_, "] no option '", item.key().substr(0, 100),
                  "'; the options are ", keys_text());
    T o{};
    for (const auto& f : fields_) {
      if (!j.contains(f.key)) continue;
      try {
        f.read(j[f.key], o);
      } catch (const nlohmann::json::exception& e) {
        MDL_FAIL("[", where_, "] option '", f.key, "': ", e.what(), " (got ", j[f.key].dump().substr(0, 80),
                 ")");
      }
    }
    if (check_) check_(o);
    return o;
  }
  /// The keys, in declaration order.
  std::vector<std::string> keys() const {
    std::vector<std::string> out;
    for (const auto& f : fields_) out.push_back(f.key);
    return out;
  }
  std::string keys_text() const {
    std::string out;
    for (const auto& f : fields_) out += (out.empty() ? "" : ", ") + f.key;
    return out;
  }
  /// Every field with T's default and its meaning; nested lists field by field under "prefix.key.".
  std::vector<FieldHelp> help(const std::string& prefix = "") const {
    const T fallback = T();  // value-initialised and named: GCC 12 at -O3 warns on the braced temporary
    const nlohmann::json defaults = write(fallback);
    std::vector<FieldHelp> out;
    for (const auto& f : fields_) {
      const std::string path = prefix.empty() ? f.key : prefix + "." + f.key;
      if (f.nested) {
        for (auto& h : f.nested(path)) out.push_back(std::move(h));
      } else {
        out.push_back({path, defaults.contains(f.key) ? defaults[f.key].dump() : "\"\"", f.help});
      }
    }
    return out;
  }

 private:
  struct Field {
    std::string key, help;
    Write write;
    Read read;
    std::function<std::vector<FieldHelp>(const std::string&)> nested;
  };
  const Field* find(const std::string& key) const {
    for (const auto& f : fields_)
      if (f.key == key) return &f;
    return nullptr;
  }
  std::string where_;
  std::vector<Field> fields_;
  std::function<void(const T&)> check_;
};

/// Help lines as a table: key, default, meaning.
std::string format_help(const std::vector<FieldHelp>& lines, int key_width = 32);

}  // namespace mdl
