#include "mdl/io/json_file.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/io/atomic_file.h"

namespace mdl::io {

nlohmann::json parse_json(const std::string& text, const std::string& source, const std::string& part) {
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    // e.byte is 1-based: the character after the last one read.
    const size_t at = std::min(e.byte > 0 ? e.byte - 1 : 0, text.size());
    const size_t line = 1 + static_cast<size_t>(std::count(
                                text.begin(), text.begin() + static_cast<std::ptrdiff_t>(at), '\n'));
    const size_t line_start = text.rfind('\n', at == 0 ? 0 : at - 1);
    const size_t column = at - (line_start == std::string::npos || at == 0 ? 0 : line_start + 1) + 1;
    // nlohmann's message ends "...; last read: '<bytes>'": keep only what it expected.
    std::string what = e.what();
    const size_t cut = what.find("; last read");
    if (cut != std::string::npos) what.resize(cut);
    const size_t colon = what.find(": ", what.find("parse error"));
    if (colon != std::string::npos) what = what.substr(colon + 2);
    MDL_FAIL("[json] '", source, "'", part, " is not valid JSON: line ", line, ", column ", column, ": ",
             what);
  }
}

nlohmann::json read_json(const std::string& path, size_t max_bytes) {
  return parse_json(read_text(path, max_bytes), path);
}

}  // namespace mdl::io
