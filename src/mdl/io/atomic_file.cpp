#include "mdl/io/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
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

namespace {

// Files a checkpoint or module directory holds: what AtomicDirectory may replace.
bool replaceable_entry(const std::filesystem::directory_entry& e) {
  std::error_code ec;
  if (!e.is_regular_file(ec)) return false;
  const std::string name = e.path().filename().string();
  const std::string ext = e.path().extension().string();
  return ext == ".json" || ext == ".safetensors" || ext == ".txt" || ext == ".model" || ext == ".md" ||
         ext == ".jsonl" || ext == ".svg" || name == ".gitattributes";
}

}  // namespace

AtomicDirectory::AtomicDirectory(std::string target) : target_(std::move(target)) {
  namespace fs = std::filesystem;
  static std::atomic<unsigned> counter{0};
  fs::path t = fs::path(target_).lexically_normal();
  if (t.filename().empty()) t = t.parent_path();  // "out/" names "out"
  target_ = t.string();
  std::error_code ec;
  if (fs::exists(t, ec)) {
    MDL_CHECK(fs::is_directory(t, ec), "[atomic_dir] '", target_, "' exists and is not a directory");
    for (const auto& e : fs::directory_iterator(t, ec))
      MDL_CHECK(replaceable_entry(e), "[atomic_dir] '", target_, "' holds '", e.path().filename().string(),
                "', which is not a checkpoint's or a module's file; the directory is replaced as a whole, so "
                "choose "
                "a new or empty one");
  }
  if (!t.parent_path().empty()) fs::create_directories(t.parent_path());
  temp_ = target_ + ".tmp." + std::to_string(getpid()) + "." + std::to_string(counter++);
  fs::create_directories(temp_, ec);
  MDL_CHECK(!ec, "[atomic_dir] cannot create '", temp_, "': ", ec.message(),
            "; is the parent directory writable?");
}

AtomicDirectory::~AtomicDirectory() {
  if (committed_) return;
  std::error_code ec;
  std::filesystem::remove_all(temp_, ec);
}

void AtomicDirectory::commit() {
  namespace fs = std::filesystem;
  MDL_CHECK(!committed_, "[atomic_dir] '", target_, "' committed twice");
  std::error_code ec;
  std::string aside;
  if (fs::exists(target_, ec)) {
    aside = target_ + ".old." + std::to_string(getpid());
    fs::remove_all(aside, ec);
    MDL_CHECK(::rename(target_.c_str(), aside.c_str()) == 0, "[atomic_dir] cannot move '", target_,
              "' aside: ", std::strerror(errno));
  }
  if (::rename(temp_.c_str(), target_.c_str()) != 0) {
    const int err = errno;
    if (!aside.empty()) ::rename(aside.c_str(), target_.c_str());  // put the old one back
    MDL_FAIL("[atomic_dir] rename '", temp_, "' -> '", target_, "' failed: ", std::strerror(err));
  }
  committed_ = true;
  if (!aside.empty()) fs::remove_all(aside, ec);
}

bool same_path(const std::string& a, const std::string& b) {
  const auto resolve = [](const std::string& p) {
    std::error_code ec;
    std::filesystem::path r = std::filesystem::weakly_canonical(p, ec);
    if (ec) r = std::filesystem::absolute(p);
    r = r.lexically_normal();
    return r.filename().empty() ? r.parent_path() : r;  // "dir/" names "dir"
  };
  return resolve(a) == resolve(b);
}

void write_text_atomic(const std::string& path, const std::string& text) {
  AtomicFile file(path);
  file.write(text);
  file.commit();
}

std::string read_text(const std::string& path, size_t max_bytes) {
  // O_NONBLOCK: opening a FIFO with no writer returns at once instead of waiting for one; the type check
  // then refuses it.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  MDL_CHECK(fd >= 0, "[read] cannot open '", path, "': ", std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  MDL_CHECK(::fstat(fd, &st) == 0, "[read] cannot stat '", path, "': ", std::strerror(errno));
  MDL_CHECK(S_ISREG(st.st_mode), "[read] '", path, "' is not a regular file (",
            S_ISFIFO(st.st_mode)  ? "a FIFO"
            : S_ISCHR(st.st_mode) ? "a character device"
            : S_ISDIR(st.st_mode) ? "a directory"
                                  : "a special file",
            "); mdl reads only regular files");
  const auto size = static_cast<size_t>(st.st_size);
  MDL_CHECK(size <= max_bytes, "[read] '", path, "' is ", size,
            " bytes; files of this kind are read whole and limited to ", max_bytes, " bytes");
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_NONBLOCK);
  std::string out(size, '\0');
  size_t got = 0;
  while (got < size) {
    const ssize_t n = ::read(fd, out.data() + got, size - got);
    if (n < 0 && errno == EINTR) continue;
    MDL_CHECK(n >= 0, "[read] reading '", path, "' failed: ", std::strerror(errno));
    if (n == 0) break;  // the file shrank while read
    got += static_cast<size_t>(n);
  }
  out.resize(got);
  return out;
}

}  // namespace mdl::io
