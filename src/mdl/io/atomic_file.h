// Atomic file writes: data goes to a temporary name beside the target and is renamed over it only when
// complete, so a crash or an error never leaves a half-written file under the real name.
#pragma once

#include <cstddef>
#include <string>

namespace mdl::io {

/// A file being written atomically. `commit()` flushes, fsyncs and renames; if the object is destroyed
/// without a commit (an exception, an early return) the temporary file is removed.
class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  /// Appends `size` bytes; throws with the path on a short write (disk full).
  void write(const void* data, size_t size);
  void write(const std::string& text) { write(text.data(), text.size()); }
  /// Makes the file visible under its final name.
  void commit();

  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::string temp_path_;
  int fd_ = -1;
  bool committed_ = false;
};

/// Writes `text` to `path` atomically.
void write_text_atomic(const std::string& path, const std::string& text);

/// Reads a whole file; throws naming the path if it cannot be read.
std::string read_text(const std::string& path);

}  // namespace mdl::io
