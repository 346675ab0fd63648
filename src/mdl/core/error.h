// Errors: every check names the operation in brackets, the values found and, where it helps, a hint.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace mdl {

/// The one exception type mdl throws; caught only by `main` and by server handlers.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}
}  // namespace detail

/// "[2, 3, 4]" for a shape, as error messages print it.
std::string shape_str(const std::vector<int64_t>& shape);

}  // namespace mdl

/// MDL_CHECK(cond, "[where] what was expected, got ", value, "; hint") throws mdl::Error.
#define MDL_CHECK(cond, ...)                                             \
  do {                                                                   \
    if (!(cond)) throw ::mdl::Error(::mdl::detail::concat(__VA_ARGS__)); \
  } while (0)

/// Throws mdl::Error with the concatenated message.
#define MDL_FAIL(...) throw ::mdl::Error(::mdl::detail::concat(__VA_ARGS__))
