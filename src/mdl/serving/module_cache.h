// The modules a server has in memory: loaded on demand from the modules directory into the one
// ModuleSet on the base model, bounded by a memory budget, least recently used evicted first. Modules a
// running request uses are pinned and never evicted. Not thread-safe: the Engine serialises calls.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <list>
#include <map>
#include <string>
#include <vector>

namespace mdl {

class ModuleSet;
struct ModuleFiles;

struct ModuleCacheOptions {
  std::string modules_dir;  ///< module directories by name (native, PEFT or AdapterHub)
  /// module tensors kept in memory at most (pinned ones may exceed it)
  int64_t budget_bytes = int64_t{1} << 30;
  /// LoRA modules are rounded on load to the values this dtype holds (float16: what the engine's LoRA
  /// bank stores), so a request computes with the same weights in every batch; float32: kept as read.
  at::ScalarType lora_dtype = at::kFloat;
};

struct ModuleCacheStats {
  int64_t hits = 0, misses = 0, evictions = 0, bytes = 0, loaded = 0;
};

class ModuleCache {
 public:
  ModuleCache(ModuleSet& set, ModuleCacheOptions options);
  /// The directory module `name` loads from: `dir` when given, else where it was loaded from before, else
  /// <modules_dir>/<name>; throws RequestError (400 for a bad name, 404 naming the directory searched).
  std::string locate(const std::string& name, const std::string& dir = "") const;
  /// Makes module `name` resident (reading locate(name, dir) if it is not) and pins it once.
  void acquire(const std::string& name, const std::string& dir = "");
  /// Unpins once (the module stays cached until evicted).
  void release(const std::string& name);
  /// Makes `name` resident from files already read (ModuleSet::read, done without the engine's lock);
  /// nothing happens when it already is.
  void insert(const std::string& name, const ModuleFiles& files);
  /// Loads files read from a directory under `name` now (POST /v1/modules); replaces nothing: a loaded
  /// name is a 409.
  void load(const std::string& name, const ModuleFiles& files);
  /// Unloads `name`; refuses while a request uses it.
  void unload(const std::string& name);
  bool resident(const std::string& name) const { return entries_.count(name) > 0; }
  /// Resident modules, and directories under modules_dir that could be loaded, sorted.
  std::vector<std::string> available() const;
  const ModuleCacheStats& stats() const { return stats_; }

 private:
  struct Entry {
    std::string dir;
    int64_t bytes = 0;
    int64_t pins = 0;
    std::list<std::string>::iterator lru;  // position in lru_ (front: most recent)
  };
  void evict_for(int64_t bytes);
  void drop(const std::string& name);
  ModuleSet& set_;
  ModuleCacheOptions options_;
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> known_;  // every module loaded so far -> its directory
  std::list<std::string> lru_;
  ModuleCacheStats stats_;
};

}  // namespace mdl
