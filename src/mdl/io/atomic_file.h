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

/// A directory of several files written whole or not at all (a checkpoint, a module): they are written
/// under a temporary sibling (`path()`), and `commit()` puts it in place of the target, which is replaced
/// as a whole (moved aside first, removed after). Destroyed without a commit, the temporary is removed
/// and the target is untouched. A target that holds more than a checkpoint's or a module's files (a
/// subdirectory, a file of another kind) is refused rather than replaced.
class AtomicDirectory {
 public:
  explicit AtomicDirectory(std::string target);
  ~AtomicDirectory();
  AtomicDirectory(const AtomicDirectory&) = delete;
  AtomicDirectory& operator=(const AtomicDirectory&) = delete;

  /// Where to write now (the temporary directory).
  const std::string& path() const { return temp_; }
  /// Makes the written directory visible under the target's name.
  void commit();

 private:
  std::string target_;
  std::string temp_;
  bool committed_ = false;
};

/// Whether two paths name the same file or directory once links and ".." are resolved (either may not
/// exist yet: its existing parent is resolved).
bool same_path(const std::string& a, const std::string& b);

/// Writes `text` to `path` atomically.
void write_text_atomic(const std::string& path, const std::string& text);

/// Reads a whole regular file of at most `max_bytes`; throws naming the path if it cannot be read, is
/// not a regular file (a FIFO would block, a device like /dev/zero never ends) or is larger.
std::string read_text(const std::string& path, size_t max_bytes = size_t{1} << 30);

}  // namespace mdl::io
