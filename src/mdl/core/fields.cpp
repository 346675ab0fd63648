#include "mdl/core/fields.h"

#include <cstdio>

namespace mdl {

std::string format_help(const std::vector<FieldHelp>& lines, int key_width) {
  std::string out;
  for (const auto& l : lines) {
    char buf[1024];
    std::snprintf(buf, sizeof(buf), "%-*s %-14s %s\n", key_width, l.key.c_str(), l.fallback.c_str(),
                  l.help.c_str());
    out += buf;
  }
  return out;
}

}  // namespace mdl
