#include "mdl/aggregation/composition.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <set>

#include "mdl/aggregation/merge.h"
#include "mdl/core/error.h"
#include "mdl/core/hash.h"
#include "mdl/modules/module_set.h"
#include "mdl/modules/module_type.h"

namespace mdl {
namespace fs = std::filesystem;

namespace {

const std::set<std::string>& merge_methods() {
  static const std::set<std::string> m = {"linear",    "task_arithmetic", "ties",  "dare_linear",
                                          "dare_ties", "magnitude_prune", "slerp", "cat",
                                          "svd"};
  return m;
}

// Deeper nesting is refused: no real composition comes near it, and the parser and the walks over its
// tree recurse once per level.
constexpr int kMaxNesting = 32;

// Bytes of the UTF-8 character that starts with `lead` (1 for a stray continuation byte).
size_t utf8_length(unsigned char lead) {
  return lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
}

// A name character outside quotes: ASCII letters, digits and _ - . / ~, and every non-ASCII character
// (names may be in any script).
bool name_char(char c) {
  const auto u = static_cast<unsigned char>(c);
  return std::isalnum(u) || c == '_' || c == '-' || c == '.' || c == '/' || c == '~' || u >= 0x80;
}

class Parser {
 public:
  explicit Parser(const std::string& text) : s_(text) {}

  Composition parse() {
    skip();
    if (pos_ == s_.size()) fail("empty expression; expected a module name or a function like stack(a, b)");
    Composition c = list();
    skip();
    if (pos_ != s_.size()) fail("unexpected " + found() + " after a complete expression");
    return c;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    MDL_FAIL("[compose] column ", pos_ + 1, ": ", what, "\n  ", s_, "\n  ", std::string(pos_, ' '), "^");
  }
  // The character at pos_, whole (a UTF-8 sequence is never cut in a message), or "the end".
  std::string found() const {
    if (pos_ >= s_.size()) return "the end";
    return "'" + s_.substr(pos_, utf8_length(static_cast<unsigned char>(s_[pos_]))) + "'";
  }
  void skip() {
    while (pos_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[pos_]))) ++pos_;
  }
  bool eat(char c) {
    skip();
    if (pos_ < s_.size() && s_[pos_] == c) return ++pos_, true;
    return false;
  }
  // list := sum (',' sum)*: applied in order (the CLI's "a,b:0.5"); sum := term ('+' term)*.
  Composition list() {
    return sequence(',', Composition::Kind::stack, [this] { return sum(); });
  }
  Composition sum() {
    return sequence('+', Composition::Kind::sum, [this] { return term(); });
  }
  template <class Next>
  Composition sequence(char separator, Composition::Kind kind, Next next) {
    const int col = static_cast<int>(pos_) + 1;
    std::vector<Composition> items = {next()};
    while (eat(separator)) items.push_back(next());
    if (items.size() == 1) return items[0];
    Composition c;
    c.kind = kind;
    c.children = std::move(items);
    c.column = col;
    return c;
  }
  double number() {
    skip();
    const size_t start = pos_;
    while (pos_ < s_.size() && (std::isdigit(static_cast<unsigned char>(s_[pos_])) || s_[pos_] == '.' ||
                                s_[pos_] == '-' || s_[pos_] == '+' || s_[pos_] == 'e' || s_[pos_] == 'E'))
      ++pos_;
    const std::string text = s_.substr(start, pos_ - start);
    try {
      size_t used = 0;
      double v = std::stod(text, &used);
      if (used == text.size() && std::isfinite(v)) return v;
    } catch (const std::exception&) {  // out of range: not finite either
    }
    pos_ = start;
    fail("expected a finite number, found " + (text.empty() ? found() : "'" + text + "'"));
  }
  // NAME, or a quoted name ("my module" or 'my module': any characters but the quote and control ones).
  std::string name() {
    if (pos_ < s_.size() && (s_[pos_] == '"' || s_[pos_] == '\'')) {
      const char quote = s_[pos_];
      const size_t open = pos_++;
      const size_t start = pos_;
      while (pos_ < s_.size() && s_[pos_] != quote) {
        if (static_cast<unsigned char>(s_[pos_]) < 0x20) fail("a control character in a quoted name");
        ++pos_;
      }
      if (pos_ == s_.size()) {
        pos_ = open;
        fail(std::string("the quoted name is not closed: expected ") + quote + " before the end");
      }
      const std::string word = s_.substr(start, pos_++ - start);
      if (word.empty()) {
        pos_ = open;
        fail("an empty quoted name");
      }
      return word;
    }
    const size_t start = pos_;
    while (pos_ < s_.size() && name_char(s_[pos_])) ++pos_;
    return s_.substr(start, pos_ - start);
  }
  Composition term() {
    skip();
    Composition c;
    c.column = static_cast<int>(pos_) + 1;
    const size_t start = pos_;
    const bool quoted = pos_ < s_.size() && (s_[pos_] == '"' || s_[pos_] == '\'');
    const std::string word = name();
    if (word.empty()) fail("expected a module name, found " + found());
    if (!quoted && eat('(')) {
      if (++depth_ > kMaxNesting) {
        pos_ = start;
        fail("compositions nest at most " + std::to_string(kMaxNesting) + " levels deep");
      }
      if (word == "stack")
        c.kind = Composition::Kind::stack;
      else if (word == "avg")
        c.kind = Composition::Kind::avg;
      else if (word == "sum")
        c.kind = Composition::Kind::sum;
      else if (word == "fuse")
        c.kind = Composition::Kind::fuse;
      else if (merge_methods().count(word))
        c.kind = Composition::Kind::merge;
      else {
        pos_ = start;
        fail("unknown function '" + word +
             "'; expected stack, avg, sum, fuse, or a merge: linear, task_arithmetic, "
             "ties, dare_linear, dare_ties, magnitude_prune, slerp, cat, svd");
      }
      c.name = word;
      c.children.push_back(sum());
      while (eat(',')) c.children.push_back(sum());
      if (eat(';')) {
        if (c.kind != Composition::Kind::merge) {
          --pos_;  // point at the ';'
          fail("only merges take parameters after ';'");
        }
        do {
          skip();
          const size_t k = pos_;
          while (pos_ < s_.size() && (std::isalnum(static_cast<unsigned char>(s_[pos_])) || s_[pos_] == '_'))
            ++pos_;
          const std::string key = s_.substr(k, pos_ - k);
          static const std::set<std::string> keys = {"density", "rank", "t", "lambda", "seed"};
          if (!keys.count(key)) {
            pos_ = k;
            fail("unknown parameter '" + key + "'; expected density, rank, t, lambda or seed");
          }
          if (!eat('=')) fail("expected '=' after '" + key + "'");
          c.params[key] = number();
        } while (eat(','));
      }
      if (!eat(')'))
        fail(pos_ < s_.size() ? "expected ',' or ')', found " + found()
                              : "expected ')' to close '" + word + "(', found the end");
      --depth_;
    } else {
      c.kind = Composition::Kind::module;
      c.name = word;
    }
    if (eat(':')) c.scale = number();
    return c;
  }

  std::string s_;
  size_t pos_ = 0;
  int depth_ = 0;  // functions open around pos_
};

std::string number_text(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

}  // namespace

std::string Composition::to_string() const {
  std::string out;
  if (kind == Kind::module) {
    // Quoted when it would not read back as one name (a space, a comma...).
    const bool plain = !name.empty() && std::all_of(name.begin(), name.end(), name_char);
    out = plain ? name : (name.find('"') == std::string::npos ? "\"" + name + "\"" : "'" + name + "'");
  } else {
    out = kind == Kind::sum     ? "sum"
          : kind == Kind::avg   ? "avg"
          : kind == Kind::stack ? "stack"
          : kind == Kind::fuse  ? "fuse"
                                : name;
    out += "(";
    for (size_t i = 0; i < children.size(); ++i) out += (i ? ", " : "") + children[i].to_string();
    if (!params.empty()) {
      out += "; ";
      bool first = true;
      for (const auto& [k, v] : params) out += (first ? "" : ", ") + k + "=" + number_text(v), first = false;
    }
    out += ")";
  }
  if (scale != 1.0) out += ":" + number_text(scale);
  return out;
}

Composition parse_composition(const std::string& text) {
  return Parser(text).parse();
}

namespace {

std::string resolve(const std::string& name, const ComposeOptions& o, int column) {
  if (!o.modules_dir.empty() && fs::exists(fs::path(o.modules_dir) / name))
    return (fs::path(o.modules_dir) / name).string();
  if (fs::exists(name)) return name;
  MDL_FAIL("[compose] column ", column, ": unknown module '", name, "'",
           o.modules_dir.empty() ? std::string("; no such directory")
                                 : "; not in the modules directory '" + o.modules_dir + "'");
}

}  // namespace

std::string module_dir(const Composition& c, const ComposeOptions& o) {
  return resolve(c.name, o, c.column);
}

std::string merged_module_dir(const Composition& c, const ComposeOptions& o) {
  MDL_CHECK(c.kind == Composition::Kind::merge, "[compose] column ", c.column, ": '", c.to_string(),
            "' is not a merge");
  MDL_CHECK(!o.model_dir.empty(), "[compose] column ", c.column, ": merging needs the base model directory");
  std::vector<std::string> inputs;
  MergeOptions m;
  m.method = c.name;
  for (const auto& child : c.children) {
    MDL_CHECK(child.kind == Composition::Kind::module, "[compose] column ", child.column, ": ", c.name,
              "(...) merges module directories; '", child.to_string(), "' is not one");
    inputs.push_back(resolve(child.name, o, child.column));
    m.weights.push_back(child.scale);
  }
  for (const auto& [k, v] : c.params) {
    if (k == "density")
      m.density = v;
    else if (k == "rank")
      m.rank = static_cast<int64_t>(v);
    else if (k == "t")
      m.t = v;
    else if (k == "lambda")
      m.lambda = v;
    else if (k == "seed")
      m.seed = static_cast<uint64_t>(v);
  }
  Composition key = c;
  key.scale = 1.0;
  const std::string cache =
      !o.cache_dir.empty()
          ? o.cache_dir
          : (fs::path(o.modules_dir.empty() ? fs::temp_directory_path().string() : o.modules_dir) /
             ".mdl-merged")
                .string();
  const std::string dir =
      (fs::path(cache) / std::to_string(fnv1a(key.to_string() + "|" + o.model_dir))).string();
  if (!fs::exists(fs::path(dir) / "module.json") && !fs::exists(fs::path(dir) / "adapter_config.json"))
    merge_modules(o.model_dir, inputs, m, dir);
  return dir;
}

std::vector<CompositionLeaf> plan_composition(const Composition& root, const ComposeOptions& o) {
  std::vector<CompositionLeaf> out;
  auto leaf = [&](const Composition& c, double scale, const std::string& within) {
    CompositionLeaf l;
    l.column = c.column;
    l.scale = scale;
    l.within = within;
    if (c.kind == Composition::Kind::merge) {
      l.kind = CompositionLeaf::Kind::merge;
      l.dir = merged_module_dir(c, o);
      Composition key = c;
      key.scale = 1.0;
      l.name = "merged-" + std::to_string(fnv1a(key.to_string()));
    } else {
      l.name = c.name;
    }
    return l;
  };
  const auto is_leaf = [](const Composition& c) {
    return c.kind == Composition::Kind::module || c.kind == Composition::Kind::merge;
  };
  std::function<void(const Composition&, double)> walk = [&](const Composition& c, double scale) {
    switch (c.kind) {
      case Composition::Kind::module:
      case Composition::Kind::merge:
        out.push_back(leaf(c, scale * c.scale, ""));
        return;
      case Composition::Kind::stack:  // application order = written order
        for (const auto& child : c.children) walk(child, scale * c.scale);
        return;
      case Composition::Kind::sum:
      case Composition::Kind::avg: {
        double total = 0;
        for (const auto& child : c.children) total += child.scale;
        MDL_CHECK(c.kind == Composition::Kind::sum || (std::abs(total) > 1e-12 && std::isfinite(total)),
                  "[compose] column ", c.column, ": avg weights sum to ", total);
        for (const auto& child : c.children) {
          MDL_CHECK(is_leaf(child), "[compose] column ", child.column, ": ",
                    c.kind == Composition::Kind::avg ? "avg" : "a sum", " takes modules or merges, not '",
                    child.to_string(), "'");
          const double w = c.kind == Composition::Kind::avg ? child.scale / total : child.scale;
          Composition unit = child;
          unit.scale = 1.0;
          out.push_back(leaf(unit, scale * c.scale * w, c.kind == Composition::Kind::avg ? "avg" : "a sum"));
        }
        return;
      }
      case Composition::Kind::fuse: {
        CompositionLeaf f;
        f.kind = CompositionLeaf::Kind::fuse;
        f.name = c.to_string();
        f.scale = scale * c.scale;
        f.column = c.column;
        for (const auto& child : c.children) {
          MDL_CHECK(is_leaf(child), "[compose] column ", child.column,
                    ": fuse takes modules or merges, not '", child.to_string(), "'");
          Composition unit = child;
          unit.scale = 1.0;
          f.members.push_back(leaf(unit, 1.0, ""));
        }
        MDL_CHECK(f.members.size() >= 2, "[compose] column ", c.column, ": fuse needs at least 2 modules");
        out.push_back(std::move(f));
        return;
      }
    }
  };
  walk(root, 1.0);
  for (const auto& l : out)
    MDL_CHECK(std::isfinite(l.scale), "[compose] column ", l.column, ": '", l.name, "' gets a scale of ",
              l.scale, "; scales must be finite");
  return out;
}

std::vector<std::string> compose(ModuleSet& set, const Composition& c, const ComposeOptions& o) {
  std::vector<std::string> used;
  // A leaf loaded onto `set` under a name of its own (a directory loaded twice gets a second name).
  auto load = [&](const CompositionLeaf& l) {
    const std::string dir = l.kind == CompositionLeaf::Kind::merge ? l.dir : resolve(l.name, o, l.column);
    std::string name = fs::path(dir).filename().string();
    if (set.contains(name)) name += "_" + std::to_string(used.size());
    set.load(dir, name, o.force);
    return name;
  };
  for (const auto& l : plan_composition(c, o)) {
    if (l.kind != CompositionLeaf::Kind::fuse) {
      const std::string name = load(l);
      if (l.scale != 1.0) set.set_scale(name, l.scale);
      const std::string& type = set.config(name).type;
      MDL_CHECK(l.within.empty() || module_type(type).additive, "[compose] column ", l.column, ": ", l.within,
                " combines additive modules (LoRA, sparse, BitFit...); '", name, "' is a ", type,
                " module, which "
                "composes by function: use stack(...)");
      used.push_back(name);
      continue;
    }
    // A fresh attention fusion over the members (AdapterFusion; train it, or load a saved one by listing
    // its directory after its members). Members must keep shapes: no prompts or prefixes.
    ModuleConfig fusion;
    fusion.type = "fusion";
    for (const auto& m : l.members) {
      const std::string name = load(m);
      used.push_back(name);
      const std::string& type = set.config(name).type;
      MDL_CHECK(
          type != "prompt" && type != "prefix", "[compose] column ", m.column, ": cannot fuse '", name,
          "', a ", type,
          " module: it prepends positions and has no output for fusion to attend over; list prompt modules "
          "to concatenate them instead");
      fusion.fusion.members.push_back(name);
    }
    std::string name = l.name;
    std::replace(name.begin(), name.end(), '/', '_');
    set.add(name, fusion);
    if (l.scale != 1.0) set.set_scale(name, l.scale);
    used.push_back(name);
  }
  return used;
}

}  // namespace mdl
