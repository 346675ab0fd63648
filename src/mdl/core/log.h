// Logging to stderr (spdlog behind a small interface, so its headers stay out of ours).
#pragma once

#include <string>

namespace mdl {

enum class LogLevel { debug, info, warn, error, off };

/// Sets the minimum level printed; default info.
void set_log_level(LogLevel level);
/// Parses "debug|info|warn|error|off".
LogLevel parse_log_level(const std::string& name);

void log_debug(const std::string& message);
void log_info(const std::string& message);
void log_warn(const std::string& message);
void log_error(const std::string& message);
/// A warning printed once per process and only by rank 0 of a distributed run (RANK unset, empty or 0):
/// for what every load of the same files would repeat. Returns whether it was printed.
bool log_warn_once(const std::string& message);

}  // namespace mdl
