// safetensors: an 8-byte little-endian header length N, N bytes of JSON
// ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}), then the raw data.
// Reading memory-maps the file; tensors alias the mapping (private, copy-on-write), so loading is
// zero-copy and writing into a loaded tensor never touches the file.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace mdl::io {

/// One tensor's header entry.
struct TensorEntry {
  std::string name;
  std::string dtype;  ///< safetensors dtype name: F32, BF16, I64, BOOL...
  std::vector<int64_t> shape;
  uint64_t begin = 0;  ///< byte offsets relative to the start of the data section
  uint64_t end = 0;
};

/// A validated, memory-mapped safetensors file.
class SafetensorsFile {
 public:
  /// Opens and validates `path`; every corruption is reported with the file and tensor name.
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const { return path_; }
  /// Tensor names in the order of their data in the file.
  std::vector<std::string> names() const;
  bool contains(const std::string& name) const { return index_.count(name) > 0; }
  /// Header entry of `name`; throws naming the file if absent.
  const TensorEntry& entry(const std::string& name) const;
  /// The tensor, aliasing the mapping (zero-copy) when its data is aligned, else a copy.
  at::Tensor tensor(const std::string& name) const;
  /// Drops the mapped pages of `name` from memory (they are re-read from the file if touched again);
  /// views from tensor() stay valid. For streaming: process a tensor, then release it.
  void release(const std::string& name) const;
  /// The `__metadata__` map (empty if absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  struct Mapping;
  std::string path_;
  std::shared_ptr<Mapping> mapping_;
  std::vector<TensorEntry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
  uint64_t data_start_ = 0;
};

/// Loads every tensor of a file (zero-copy views of one mapping).
std::map<std::string, at::Tensor> load_safetensors(const std::string& path);

/// Writes a file tensor by tensor (bounded memory): the header is fixed up front from the entries'
/// names, dtypes and shapes (offsets are computed), then each tensor is written in that order.
class SafetensorsWriter {
 public:
  SafetensorsWriter(const std::string& path, std::vector<TensorEntry> entries,
                    const std::map<std::string, std::string>& metadata = {});
  /// Writes the next tensor; its dtype and shape must match the next entry.
  void write(const at::Tensor& tensor);
  /// Writes the next tensor in parts: blocks of whole rows, in order, of the entry's dtype; the entry is
  /// complete once its bytes are written.
  void write_part(const at::Tensor& rows);
  /// Checks every tensor was written and makes the file visible (atomic rename).
  void commit();
  ~SafetensorsWriter();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Writes tensors (any device, any layout: made contiguous on the CPU) atomically.
void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

/// safetensors dtype name <-> torch scalar type; throws for dtypes this libtorch lacks.
c10::ScalarType safetensors_dtype(const std::string& name);
std::string safetensors_dtype_name(c10::ScalarType dtype);

}  // namespace mdl::io
