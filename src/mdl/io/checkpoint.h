// A Hugging Face checkpoint's tensors: one `model.safetensors`, or shards listed by
// `model.safetensors.index.json` ({"metadata": {...}, "weight_map": {tensor: shard file}}). Shards are
// opened lazily and memory-mapped, so reading one tensor costs one tensor.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace mdl::io {

class SafetensorsFile;

/// Read access to the tensors of a checkpoint directory or of a single .safetensors file.
class CheckpointReader {
 public:
  /// `path`: a directory holding model.safetensors or model.safetensors.index.json, or a .safetensors file.
  explicit CheckpointReader(const std::string& path);
  ~CheckpointReader();

  const std::string& path() const { return path_; }
  /// All tensor names, sorted.
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return file_of_.count(name) > 0; }
  /// The tensor (zero-copy view of its shard's mapping).
  at::Tensor tensor(const std::string& name) const;
  /// Releases the mapped pages of `name` (see SafetensorsFile::release).
  void release(const std::string& name) const;
  /// Shape and safetensors dtype name without touching the data.
  std::vector<int64_t> shape(const std::string& name) const;
  std::string dtype(const std::string& name) const;
  /// The shard file that holds `name`.
  const std::string& file_of(const std::string& name) const;
  /// Shard files in order.
  const std::vector<std::string>& files() const { return files_; }

 private:
  const SafetensorsFile& open(const std::string& file) const;
  std::string path_;
  std::vector<std::string> files_;
  std::map<std::string, std::string> file_of_;
  mutable std::map<std::string, std::unique_ptr<SafetensorsFile>> open_;
};

/// Writes tensors as `model.safetensors`, or, when their total exceeds `max_shard_bytes` (> 0), as
/// `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json`. Every file is atomic.
void save_checkpoint_tensors(const std::string& dir, const std::map<std::string, at::Tensor>& tensors,
                             const std::map<std::string, std::string>& metadata = {},
                             int64_t max_shard_bytes = 0);

/// Copies a checkpoint's files other than its weights (tokenizer, tokenizer and generation configs; with
/// `config`, config.json too) from directory `from` to `to`, atomically, skipping those it lacks.
void copy_side_files(const std::string& from, const std::string& to, bool config);

}  // namespace mdl::io
