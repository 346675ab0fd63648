#include "mdl/serving/module_cache.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <filesystem>

#include "mdl/aggregation/merge.h"
#include "mdl/core/error.h"
#include "mdl/core/log.h"
#include "mdl/modules/module_set.h"
#include "mdl/serving/request_error.h"

namespace mdl {
namespace fs = std::filesystem;

namespace {

/// Module names are directory names (check_module_name); a bad one is the request's fault.
void check_name(const std::string& name, const char* param) {
  try {
    check_module_name(name);
  } catch (const Error& e) {
    throw RequestError(400, param, e.what());
  }
}

/// fs::is_directory without throwing: a symlink loop or an unreadable entry is simply not a module.
bool is_module_directory(const fs::path& p) {
  std::error_code ec;
  if (!fs::is_directory(p, ec) || ec) return false;
  try {
    return is_module_dir(p.string());
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

ModuleCache::ModuleCache(ModuleSet& set, ModuleCacheOptions options)
    : set_(set), options_(std::move(options)) {
  MDL_CHECK(options_.budget_bytes > 0, "[serve] the module cache budget must be > 0 bytes, got ",
            options_.budget_bytes);
}

std::string ModuleCache::locate(const std::string& name, const std::string& dir) const {
  if (!dir.empty()) return dir;
  if (known_.count(name)) return known_.at(name);  // evicted earlier: reload from where it was
  check_name(name, "model");
  if (options_.modules_dir.empty())
    throw RequestError(404, "model",
                       "[serve] unknown module '" + name + "': the server has no modules directory");
  const fs::path path = fs::path(options_.modules_dir) / name;
  if (!is_module_directory(path))
    throw RequestError(404, "model",
                       "[serve] unknown module '" + name + "': no module directory '" + path.string() + "'");
  return path.string();
}

void ModuleCache::acquire(const std::string& name, const std::string& dir) {
  auto it = entries_.find(name);
  if (it != entries_.end()) {
    ++stats_.hits;
    lru_.splice(lru_.begin(), lru_, it->second.lru);
  } else {
    ++stats_.misses;
    insert(name, set_.read(locate(name, dir)));
    it = entries_.find(name);
  }
  ++it->second.pins;
}

void ModuleCache::release(const std::string& name) {
  auto it = entries_.find(name);
  if (it != entries_.end() && it->second.pins > 0) --it->second.pins;
}

void ModuleCache::load(const std::string& name, const ModuleFiles& files) {
  check_name(name, "name");
  if (entries_.count(name))
    throw RequestError(409, "name", "[serve] module '" + name + "' is already loaded; unload it first");
  insert(name, files);
}

void ModuleCache::unload(const std::string& name) {
  known_.erase(name);  // an explicit unload forgets the directory; an eviction (drop) keeps it
  drop(name);
}

void ModuleCache::drop(const std::string& name) {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw RequestError(404, "name", "[serve] module '" + name + "' is not loaded");
  if (it->second.pins > 0)
    throw RequestError(409, "name",
                       "[serve] module '" + name + "' is in use by " + std::to_string(it->second.pins) +
                           " request(s); retry when they finish");
  set_.remove(name);
  stats_.bytes -= it->second.bytes;
  lru_.erase(it->second.lru);
  entries_.erase(it);
  stats_.loaded = static_cast<int64_t>(entries_.size());
}

std::vector<std::string> ModuleCache::available() const {
  std::vector<std::string> out;
  for (const auto& [name, e] : entries_) out.push_back(name);
  std::error_code ec;
  if (!options_.modules_dir.empty() && fs::is_directory(options_.modules_dir, ec)) {
    // An entry that cannot be read (a symlink loop, no permission) is skipped and logged, never an error
    // for the client asking.
    for (auto d = fs::directory_iterator(options_.modules_dir, ec); !ec && d != fs::directory_iterator();
         d.increment(ec)) {
      const std::string name = d->path().filename().string();
      if (name.empty() || name[0] == '.' || entries_.count(name)) continue;
      std::error_code entry_ec;
      (void)fs::status(d->path(), entry_ec);
      if (entry_ec) {
        log_warn("[serve] skipping '" + d->path().string() +
                 "' in the modules directory: " + entry_ec.message());
        continue;
      }
      if (is_module_directory(d->path())) out.push_back(name);
    }
    if (ec)
      log_warn("[serve] listing the modules directory '" + options_.modules_dir +
               "' failed: " + ec.message());
  }
  std::sort(out.begin(), out.end());
  return out;
}

void ModuleCache::insert(const std::string& name, const ModuleFiles& files) {
  if (entries_.count(name)) return;
  const std::string& dir = files.dir;
  set_.attach(files, name);
  if (options_.lora_dtype != at::kFloat && set_.config(name).type == "lora")
    set_.round_tensors(name, options_.lora_dtype);
  int64_t bytes = 0;
  for (const auto& [k, t] : set_.tensors(name)) bytes += t.numel() * static_cast<int64_t>(t.element_size());
  try {
    evict_for(bytes);
  } catch (...) {
    set_.remove(name);
    throw;
  }
  lru_.push_front(name);
  entries_[name] = Entry{dir, bytes, 0, lru_.begin()};
  known_[name] = dir;
  stats_.bytes += bytes;
  stats_.loaded = static_cast<int64_t>(entries_.size());
}

void ModuleCache::evict_for(int64_t bytes) {
  // Least recently used first; pinned modules stay (the budget may then be exceeded until they finish).
  for (auto it = lru_.rbegin(); it != lru_.rend() && stats_.bytes + bytes > options_.budget_bytes;) {
    const std::string victim = *it;
    ++it;
    if (entries_.at(victim).pins > 0) continue;
    drop(victim);
    ++stats_.evictions;
    log_info("[serve] evicted module '" + victim + "' (cache budget " +
             std::to_string(options_.budget_bytes >> 20) + " MiB)");
    it = lru_.rbegin();  // the list changed
  }
  if (stats_.bytes + bytes > options_.budget_bytes)
    log_warn("[serve] module cache over budget: " + std::to_string(stats_.bytes + bytes) + " > " +
             std::to_string(options_.budget_bytes) + " bytes (modules in use are not evicted)");
}

}  // namespace mdl
