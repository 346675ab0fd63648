// JSON files as mdl reads them: parse errors name the file, the line and the column and what the parser
// expected, never the bytes around it (a file that is not what it should be may be anything, and a
// server must not echo it back).
#pragma once

#include <cstddef>
#include <nlohmann/json_fwd.hpp>
#include <string>

namespace mdl::io {

/// Small JSON files (configs, module.json, adapter_config.json, trainer.json): 16 MiB at most.
constexpr size_t kMaxJsonFileBytes = size_t{16} << 20;

/// Parses `text` read from `source` (a path; `part` says which part of it, e.g. " (its header)"); throws
/// "[json] 'SOURCE' is not valid JSON: line L, column C: ..." without quoting the text.
nlohmann::json parse_json(const std::string& text, const std::string& source, const std::string& part = "");

/// Reads (read_text: a regular file of at most `max_bytes`) and parses `path`.
nlohmann::json read_json(const std::string& path, size_t max_bytes = kMaxJsonFileBytes);

}  // namespace mdl::io
