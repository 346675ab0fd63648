#include "mdl/io/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "mdl/core/error.h"

namespace mdl::io {

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  static std::atomic<unsigned> counter{0};
  temp_path_ = path_ + ".tmp." + std::to_string(getpid()) + "." + std::to_string(counter++);
  fd_ = ::open(temp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  MDL_CHECK(fd_ >= 0, "[atomic_file] cannot create '", temp_path_, "': ", std::strerror(errno),
            "; does the directory exist and is it writable?");
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) ::close(fd_);
  if (!committed_) ::unlink(temp_path_.c_str());
}

void AtomicFile::write(const void* data, size_t size) {
  const char* p = static_cast<const char*>(data);
  while (size > 0) {
    ssize_t n = ::write(fd_, p, size);
    if (n < 0 && errno == EINTR) continue;
    MDL_CHECK(n > 0, "[atomic_file] write to '", temp_path_, "' failed: ", std::strerror(errno));
    p += n;
    size -= static_cast<size_t>(n);
  }
}

void AtomicFile::commit() {
  MDL_CHECK(!committed_, "[atomic_file] '", path_, "' committed twice");
  MDL_CHECK(::fsync(fd_) == 0, "[atomic_file] fsync of '", temp_path_, "' failed: ", std::strerror(errno));
  ::close(fd_);
  fd_ = -1;
  MDL_CHECK(::rename(temp_path_.c_str(), path_.c_str()) == 0, "[atomic_file] rename '", temp_path_, "' -> '",
            path_, "' failed: ", std::strerror(errno));
  committed_ = true;
}

void write_text_atomic(const std::string& path, const std::string& text) {
  AtomicFile file(path);
  file.write(text);
  file.commit();
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MDL_CHECK(in.good(), "[read] cannot open '", path, "': ", std::strerror(errno));
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

}  // namespace mdl::io
