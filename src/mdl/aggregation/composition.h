// The composition language: one small expression syntax for which modules a forward uses and how they
// combine, shared by the CLI (`--modules`), the trainer and the server.
//
//   list   := expr (',' expr)*                             (applied in order, as stack: "a,b:0.5")
//   expr   := term ('+' term)*
//   term   := NAME [':' NUMBER]  |  FUNC '(' expr (',' expr)* [';' KEY '=' NUMBER (',' KEY '=' NUMBER)*] ')'
//   [':' NUMBER] FUNC   := stack | avg | sum | fuse | linear | task_arithmetic | ties | dare_linear |
//   dare_ties |
//             magnitude_prune | slerp | cat | svd
//   NAME   := letters (any script), digits, _ - . / ~  |  "any name"  |  'any name'   (quoted: spaces,
//   commas) NUMBER := a finite decimal number; functions nest at most 32 levels deep
//
//   stack(lang/de, task/nli)     task adapter applied to the language adapter's output (MAD-X)
//   avg(a:0.7, b:0.3)            output average, weights normalised to sum to one
//   a:0.5 + b:0.5                weighted sum of the modules' contributions
//   ties(a, b, c; density=0.5)   a merged module (computed once, cached by its expression), then used
//   fuse(a, b, c)                a new attention fusion (AdapterFusion) over the modules' outputs, to train;
//                                a trained one loads as a module listed after its members: a, b, c,
//                                fusion_dir
//
// Names are module directories: relative to the modules directory when one is given, else paths.
// Parse errors give the column; semantic errors (unknown modules, avg over adapters, fuse over prompts)
// give the reason.
#pragma once

#include <map>
#include <string>
#include <vector>

namespace mdl {

class ModuleSet;

/// A parsed expression.
struct Composition {
  enum class Kind { module, sum, avg, stack, fuse, merge };
  Kind kind = Kind::module;
  std::string name;    ///< module: its name or path; merge: the method
  double scale = 1.0;  ///< ":NUMBER"
  std::vector<Composition> children;
  std::map<std::string, double> params;  ///< merge parameters (density, rank, t, lambda, seed)
  int column = 1;                        ///< where it starts in the text (1-based)

  /// Canonical text (also the cache key of a merge).
  std::string to_string() const;
};

/// Parses `text`; throws "[compose] column N: ..." with the text and a caret under the column.
Composition parse_composition(const std::string& text);

/// Where names resolve and merged modules are cached.
struct ComposeOptions {
  std::string model_dir;    ///< the base checkpoint (for merges)
  std::string modules_dir;  ///< names resolve here first; empty: names are paths
  std::string cache_dir;    ///< merged modules are written here (default: <modules_dir or /tmp>/.mdl-merged)
  bool force = false;       ///< load modules made for another base when shapes fit
};

/// The directory of the module a merge node (`ties(a, b; density=0.5)`) produces: computed on first use
/// under the cache directory, keyed by the canonical expression and the base model, then reused.
std::string merged_module_dir(const Composition& merge, const ComposeOptions& options);
/// A module name of `c` resolved to its directory (modules_dir first, then as a path); throws naming the
/// column when neither exists.
std::string module_dir(const Composition& c, const ComposeOptions& options);

/// One module a composition uses, in application order: what every consumer (the CLI's compose, the
/// serving engine's per-request choices) makes of an expression, from one interpreter (plan_composition).
struct CompositionLeaf {
  enum class Kind { module, merge, fuse };
  Kind kind = Kind::module;
  std::string
      name;  ///< module: as written; merge: "merged-<hash of its canonical text>"; fuse: canonical text
  std::string dir;     ///< merge: the merged module's directory (computed on first use); else empty
  double scale = 1.0;  ///< every enclosing scale multiplied in; avg weights normalised
  std::string
      within;  ///< "avg" or "a sum" when inside one: the module must be additive (checked once loaded)
  int column = 1;
  std::vector<CompositionLeaf> members;  ///< fuse: the fused modules (modules or merges, scale 1)
};

/// The leaves of `c` in application order (stack: in order; sum and avg: their terms, weighted; merges
/// computed now). Throws "[compose] column N: ..." for forms that make no sense (avg weights summing to
/// 0, a sum or fuse over something that is not a module or a merge).
std::vector<CompositionLeaf> plan_composition(const Composition& c, const ComposeOptions& options);

/// Loads and configures the modules of `c` on `set` (activation, scales, stacking order); returns the
/// names of the modules it uses, in application order.
std::vector<std::string> compose(ModuleSet& set, const Composition& c, const ComposeOptions& options);

}  // namespace mdl
