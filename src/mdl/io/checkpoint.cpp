#include "mdl/io/checkpoint.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/json_file.h"
#include "mdl/io/safetensors.h"

namespace fs = std::filesystem;

namespace mdl::io {

CheckpointReader::CheckpointReader(const std::string& path) : path_(path) {
  MDL_CHECK(fs::exists(path), "[checkpoint] '", path, "' does not exist");
  if (fs::is_regular_file(path)) {
    files_.push_back(path);
  } else {
    const fs::path dir(path);
    const fs::path single = dir / "model.safetensors";
    const fs::path index = dir / "model.safetensors.index.json";
    if (fs::exists(single)) {
      files_.push_back(single.string());
    } else if (fs::exists(index)) {
      const nlohmann::json j = read_json(index.string());
      MDL_CHECK(j.is_object() && j.contains("weight_map") && j["weight_map"].is_object(), "[checkpoint] '",
                index.string(), "' has no object field 'weight_map'");
      std::map<std::string, bool> seen;
      for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
        MDL_CHECK(it.value().is_string(), "[checkpoint] '", index.string(), "': weight_map['", it.key(),
                  "'] must be a file name, found ", it.value().dump());
        // A shard is a file of this directory: an absolute name or one that climbs out ("../../etc/passwd")
        // is refused (links inside the directory, as in the Hugging Face cache, are followed as usual).
        const fs::path name = fs::path(it.value().get<std::string>()).lexically_normal();
        MDL_CHECK(!name.empty() && name.is_relative() && *name.begin() != "..", "[checkpoint] '",
                  index.string(), "' maps '", it.key(), "' to '", it.value().get<std::string>(),
                  "', which is not a file inside '", dir.string(),
                  "'; shards are named relative to the checkpoint directory");
        const std::string shard = (dir / name).string();
        MDL_CHECK(fs::exists(shard), "[checkpoint] '", index.string(), "' maps '", it.key(), "' to '", shard,
                  "', which does not exist; incomplete download?");
        if (!seen[shard]) files_.push_back(shard), seen[shard] = true;
        file_of_[it.key()] = shard;
      }
      return;
    } else {
      MDL_FAIL("[checkpoint] '", path, "' has neither model.safetensors nor model.safetensors.index.json");
    }
  }
  for (const auto& name : open(files_[0]).names()) file_of_[name] = files_[0];
}

CheckpointReader::~CheckpointReader() = default;

const SafetensorsFile& CheckpointReader::open(const std::string& file) const {
  auto it = open_.find(file);
  if (it == open_.end()) it = open_.emplace(file, std::make_unique<SafetensorsFile>(file)).first;
  return *it->second;
}

std::vector<std::string> CheckpointReader::names() const {
  std::vector<std::string> out;
  for (const auto& [name, file] : file_of_) out.push_back(name);
  return out;
}

const std::string& CheckpointReader::file_of(const std::string& name) const {
  auto it = file_of_.find(name);
  MDL_CHECK(it != file_of_.end(), "[checkpoint] '", path_, "' has no tensor '", name, "'");
  return it->second;
}

void CheckpointReader::release(const std::string& name) const {
  open(file_of(name)).release(name);
}

at::Tensor CheckpointReader::tensor(const std::string& name) const {
  const SafetensorsFile& f = open(file_of(name));
  MDL_CHECK(f.contains(name), "[checkpoint] index of '", path_, "' maps '", name, "' to '", f.path(),
            "', which does not contain it; stale index?");
  return f.tensor(name);
}

std::vector<int64_t> CheckpointReader::shape(const std::string& name) const {
  return open(file_of(name)).entry(name).shape;
}

std::string CheckpointReader::dtype(const std::string& name) const {
  return open(file_of(name)).entry(name).dtype;
}

void save_checkpoint_tensors(const std::string& dir, const std::map<std::string, at::Tensor>& tensors,
                             const std::map<std::string, std::string>& metadata, int64_t max_shard_bytes) {
  fs::create_directories(dir);
  int64_t total = 0;
  for (const auto& [name, t] : tensors) total += t.numel() * t.element_size();
  if (max_shard_bytes <= 0 || total <= max_shard_bytes) {
    save_safetensors((fs::path(dir) / "model.safetensors").string(), tensors, metadata);
    return;
  }
  std::vector<std::map<std::string, at::Tensor>> shards(1);
  int64_t current = 0;
  for (const auto& [name, t] : tensors) {
    int64_t n = t.numel() * t.element_size();
    if (current > 0 && current + n > max_shard_bytes) shards.emplace_back(), current = 0;
    shards.back().emplace(name, t);
    current += n;
  }
  nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", nlohmann::json::object()}};
  char buf[64];
  for (size_t i = 0; i < shards.size(); ++i) {
    std::snprintf(buf, sizeof(buf), "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    save_safetensors((fs::path(dir) / buf).string(), shards[i], metadata);
    for (const auto& [name, t] : shards[i]) index["weight_map"][name] = buf;
  }
  write_text_atomic((fs::path(dir) / "model.safetensors.index.json").string(), index.dump(2) + "\n");
}

void copy_side_files(const std::string& from, const std::string& to, bool config) {
  namespace fs = std::filesystem;
  for (const char* f : {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                        "generation_config.json"})
    if ((config || std::string(f) != "config.json") && fs::exists(fs::path(from) / f))
      write_text_atomic((fs::path(to) / f).string(), read_text((fs::path(from) / f).string()));
}

}  // namespace mdl::io
