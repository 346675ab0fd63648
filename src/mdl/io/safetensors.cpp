#include "mdl/io/safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/json_file.h"

namespace mdl::io {
namespace {

struct DtypeInfo {
  const char* name;
  c10::ScalarType type;
  size_t size;
};

const DtypeInfo kDtypes[] = {
    {"F64", c10::kDouble, 8}, {"F32", c10::kFloat, 4}, {"F16", c10::kHalf, 2},  {"BF16", c10::kBFloat16, 2},
    {"I64", c10::kLong, 8},   {"I32", c10::kInt, 4},   {"I16", c10::kShort, 2}, {"I8", c10::kChar, 1},
    {"U8", c10::kByte, 1},    {"BOOL", c10::kBool, 1},
};

const DtypeInfo* find_dtype(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return &d;
  return nullptr;
}

}  // namespace

c10::ScalarType safetensors_dtype(const std::string& name) {
  const DtypeInfo* d = find_dtype(name);
  MDL_CHECK(d, "[safetensors] dtype '", name,
            "' is not supported; expected one of F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL");
  return d->type;
}

std::string safetensors_dtype_name(c10::ScalarType dtype) {
  for (const auto& d : kDtypes)
    if (d.type == dtype) return d.name;
  MDL_FAIL("[safetensors] torch dtype ", c10::toString(dtype), " has no safetensors equivalent here");
}

struct SafetensorsFile::Mapping {
  void* data = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (data && data != MAP_FAILED) munmap(data, size);
  }
};

SafetensorsFile::SafetensorsFile(const std::string& path)
    : path_(path), mapping_(std::make_shared<Mapping>()) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);  // a FIFO must not block the open
  MDL_CHECK(fd >= 0, "[safetensors] cannot open '", path, "': ", std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    MDL_FAIL("[safetensors] '", path, "' is not a regular file");
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    MDL_FAIL("[safetensors] '", path, "' is ", file_size,
             " bytes, smaller than the 8-byte header length; empty or truncated file?");
  }
  // MAP_PRIVATE + PROT_WRITE: copy-on-write, so an in-place update of a loaded tensor stays in memory.
  void* data = mmap(nullptr, file_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ::close(fd);
  MDL_CHECK(data != MAP_FAILED, "[safetensors] cannot map '", path, "': ", std::strerror(errno));
  mapping_->data = data;
  mapping_->size = file_size;
  const auto* bytes = static_cast<const uint8_t*>(data);

  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  MDL_CHECK(header_len <= file_size - 8, "[safetensors] '", path, "': header is ", header_len,
            " bytes but the file is only ", file_size, " bytes; incomplete download or corrupt file?");
  data_start_ = 8 + header_len;
  const uint64_t data_size = file_size - data_start_;

  const nlohmann::json header =
      parse_json(std::string(reinterpret_cast<const char*>(bytes) + 8, header_len), path, " (its header)");
  MDL_CHECK(header.is_object(), "[safetensors] '", path, "': header must be a JSON object, found ",
            header.type_name());

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const nlohmann::json& v = it.value();
    if (name == "__metadata__") {
      MDL_CHECK(v.is_object(), "[safetensors] '", path, "': __metadata__ must be an object of strings");
      for (auto m = v.begin(); m != v.end(); ++m) {
        MDL_CHECK(m.value().is_string(), "[safetensors] '", path, "': __metadata__ value for '", m.key(),
                  "' must be a string, found ", m.value().type_name());
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = "[safetensors] '" + path + "', tensor '" + name + "': ";
    MDL_CHECK(v.is_object(), where, "entry must be an object, found ", v.type_name());
    MDL_CHECK(v.contains("dtype") && v["dtype"].is_string(), where, "missing string field 'dtype'");
    MDL_CHECK(v.contains("shape") && v["shape"].is_array(), where, "missing array field 'shape'");
    MDL_CHECK(v.contains("data_offsets") && v["data_offsets"].is_array() && v["data_offsets"].size() == 2,
              where, "missing field 'data_offsets' ([begin, end])");
    TensorEntry e;
    e.name = name;
    e.dtype = v["dtype"].get<std::string>();
    const DtypeInfo* d = find_dtype(e.dtype);
    MDL_CHECK(d, where, "dtype '", e.dtype,
              "' is not supported; expected one of F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL");
    uint64_t numel = 1;
    bool overflow = false;
    for (const auto& dim : v["shape"]) {
      MDL_CHECK(dim.is_number_unsigned() || (dim.is_number_integer() && dim.get<int64_t>() >= 0), where,
                "shape entries must be non-negative integers, found ", dim.dump());
      uint64_t n = dim.get<uint64_t>();
      if (n != 0 && numel > UINT64_MAX / n) overflow = true;
      numel *= n;
      e.shape.push_back(static_cast<int64_t>(n));
    }
    for (const auto& off : v["data_offsets"])
      MDL_CHECK(off.is_number_unsigned() || (off.is_number_integer() && off.get<int64_t>() >= 0), where,
                "data_offsets must be non-negative integers, found ", v["data_offsets"].dump());
    e.begin = v["data_offsets"][0].get<uint64_t>();
    e.end = v["data_offsets"][1].get<uint64_t>();
    MDL_CHECK(!overflow && numel <= UINT64_MAX / d->size, where, "shape ", shape_str(e.shape), " overflows");
    MDL_CHECK(e.begin <= e.end, where, "data_offsets [", e.begin, ", ", e.end, "] has begin > end");
    MDL_CHECK(e.end <= data_size, where, "data_offsets [", e.begin, ", ", e.end,
              "] extend past the data section (", data_size, " bytes); truncated file?");
    MDL_CHECK(e.end - e.begin == numel * d->size, where, e.dtype, " x ", shape_str(e.shape), " needs ",
              numel * d->size, " bytes but data_offsets [", e.begin, ", ", e.end, "] span ", e.end - e.begin);
    entries_.push_back(std::move(e));
  }
  std::sort(entries_.begin(), entries_.end(), [](const TensorEntry& a, const TensorEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  for (size_t i = 0; i < entries_.size(); ++i) {
    if (i > 0) {
      const TensorEntry& p = entries_[i - 1];
      const TensorEntry& c = entries_[i];
      MDL_CHECK(c.begin >= p.end || c.begin == c.end || p.begin == p.end, "[safetensors] '", path,
                "': tensors '", p.name, "' [", p.begin, ", ", p.end, ") and '", c.name, "' [", c.begin, ", ",
                c.end, ") overlap; corrupt file?");
    }
    index_[entries_[i].name] = i;
  }
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& e : entries_) out.push_back(e.name);
  return out;
}

const TensorEntry& SafetensorsFile::entry(const std::string& name) const {
  auto it = index_.find(name);
  MDL_CHECK(it != index_.end(), "[safetensors] '", path_, "' has no tensor '", name, "'");
  return entries_[it->second];
}

at::Tensor SafetensorsFile::tensor(const std::string& name) const {
  const TensorEntry& e = entry(name);
  const DtypeInfo* d = find_dtype(e.dtype);
  auto options = at::TensorOptions().dtype(d->type);
  if (e.end == e.begin) return at::empty(e.shape, options);
  auto* ptr = static_cast<uint8_t*>(mapping_->data) + data_start_ + e.begin;
  if (reinterpret_cast<uintptr_t>(ptr) % d->size != 0) {
    at::Tensor copy = at::empty(e.shape, options);
    std::memcpy(copy.data_ptr(), ptr, e.end - e.begin);
    return copy;
  }
  std::shared_ptr<Mapping> keep = mapping_;
  return at::from_blob(
      ptr, e.shape, [keep](void*) {}, options);
}

void SafetensorsFile::release(const std::string& name) const {
  const TensorEntry& e = entry(name);
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  auto* base = static_cast<uint8_t*>(mapping_->data);
  const uintptr_t from = (reinterpret_cast<uintptr_t>(base + data_start_ + e.begin) + page - 1) / page * page;
  const uintptr_t to = reinterpret_cast<uintptr_t>(base + data_start_ + e.end) / page * page;
  if (to > from)
    madvise(reinterpret_cast<void*>(from), to - from,
            MADV_DONTNEED);  // clean pages: re-read if touched again
}

std::map<std::string, at::Tensor> load_safetensors(const std::string& path) {
  SafetensorsFile file(path);
  std::map<std::string, at::Tensor> out;
  for (const auto& name : file.names()) out.emplace(name, file.tensor(name));
  return out;
}

struct SafetensorsWriter::Impl {
  explicit Impl(const std::string& path) : file(path) {}
  AtomicFile file;
  std::vector<TensorEntry> entries;
  size_t next = 0;
  uint64_t part_bytes = 0;  ///< of entries[next], when written in parts
};

SafetensorsWriter::SafetensorsWriter(const std::string& path, std::vector<TensorEntry> entries,
                                     const std::map<std::string, std::string>& metadata)
    : impl_(std::make_unique<Impl>(path)) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (auto& e : entries) {
    MDL_CHECK(e.name != "__metadata__", "[safetensors] '", path,
              "': '__metadata__' is not a valid tensor name");
    uint64_t n = static_cast<uint64_t>(find_dtype(e.dtype)->size);
    for (int64_t d : e.shape) n *= static_cast<uint64_t>(d);
    e.begin = offset, e.end = offset + n;
    header[e.name] = {{"dtype", e.dtype}, {"shape", e.shape}, {"data_offsets", {e.begin, e.end}}};
    offset += n;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));
  impl_->file.write(len, 8);
  impl_->file.write(text);
  impl_->entries = std::move(entries);
}

SafetensorsWriter::~SafetensorsWriter() = default;

void SafetensorsWriter::write(const at::Tensor& tensor) {
  const std::string& path = impl_->file.path();
  MDL_CHECK(impl_->next < impl_->entries.size(), "[safetensors] '", path,
            "': more tensors written than declared (", impl_->entries.size(), ")");
  const TensorEntry& e = impl_->entries[impl_->next];
  at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
  MDL_CHECK(safetensors_dtype_name(t.scalar_type()) == e.dtype && t.sizes().vec() == e.shape,
            "[safetensors] '", path, "': tensor '", e.name, "' declared ", e.dtype, " ", shape_str(e.shape),
            ", written ", safetensors_dtype_name(t.scalar_type()), " ", shape_str(t.sizes().vec()));
  MDL_CHECK(impl_->part_bytes == 0, "[safetensors] '", path, "': tensor '", e.name,
            "' was being written in parts");
  impl_->file.write(t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size());
  ++impl_->next;
}

void SafetensorsWriter::write_part(const at::Tensor& rows) {
  const std::string& path = impl_->file.path();
  MDL_CHECK(impl_->next < impl_->entries.size(), "[safetensors] '", path,
            "': more tensors written than declared (", impl_->entries.size(), ")");
  const TensorEntry& e = impl_->entries[impl_->next];
  at::Tensor t = rows.detach().to(at::kCPU).contiguous();
  const uint64_t n = static_cast<uint64_t>(t.numel()) * t.element_size();
  MDL_CHECK(safetensors_dtype_name(t.scalar_type()) == e.dtype && impl_->part_bytes + n <= e.end - e.begin,
            "[safetensors] '", path, "': a part of tensor '", e.name, "' (",
            safetensors_dtype_name(t.scalar_type()), " ", shape_str(t.sizes().vec()),
            ") does not fit its declared ", e.dtype, " ", shape_str(e.shape));
  impl_->file.write(t.data_ptr(), static_cast<size_t>(n));
  impl_->part_bytes += n;
  if (impl_->part_bytes == e.end - e.begin) impl_->part_bytes = 0, ++impl_->next;
}

void SafetensorsWriter::commit() {
  MDL_CHECK(impl_->next == impl_->entries.size(), "[safetensors] '", impl_->file.path(), "': ", impl_->next,
            " of ", impl_->entries.size(), " declared tensors written");
  impl_->file.commit();
}

void save_safetensors(const std::string& path, const std::map<std::string, at::Tensor>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  // Larger elements first keeps every tensor aligned to its element size (as the reference writer does).
  std::vector<std::pair<std::string, at::Tensor>> order;
  for (const auto& [name, t] : tensors) {
    MDL_CHECK(t.defined(), "[safetensors] '", path, "': tensor '", name, "' is undefined");
    order.emplace_back(name, t);
  }
  std::stable_sort(order.begin(), order.end(), [](const auto& a, const auto& b) {
    return a.second.element_size() > b.second.element_size();
  });
  std::vector<TensorEntry> entries;
  for (const auto& [name, t] : order)
    entries.push_back({name, safetensors_dtype_name(t.scalar_type()), t.sizes().vec(), 0, 0});
  SafetensorsWriter writer(path, std::move(entries), metadata);
  for (const auto& [name, t] : order) writer.write(t);
  writer.commit();
}

}  // namespace mdl::io
