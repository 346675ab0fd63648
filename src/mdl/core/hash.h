// A stable 64-bit hash (FNV-1a): the same value on every platform, build and run, for what must be
// reproducible or stored: module fingerprints, cache keys, seeds derived from names.
#pragma once

#include <cstdint>
#include <string_view>

namespace mdl {

constexpr uint64_t kFnvOffset = 1469598103934665603ull;

/// FNV-1a of `text`, continuing from `h` (pass an earlier result to hash a sequence of parts).
inline uint64_t fnv1a(std::string_view text, uint64_t h = kFnvOffset) {
  for (char ch : text) h = (h ^ static_cast<unsigned char>(ch)) * 1099511628211ull;
  return h;
}

}  // namespace mdl
