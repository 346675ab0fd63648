#include "mdl/core/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <cstdlib>
#include <mutex>
#include <set>

#include "mdl/core/error.h"

namespace mdl {
namespace {
std::shared_ptr<spdlog::logger> logger() {
  static std::shared_ptr<spdlog::logger> instance = [] {
    auto l = spdlog::stderr_color_mt("mdl");
    l->set_pattern("[%^%l%$] %v");
    l->set_level(spdlog::level::info);
    return l;
  }();
  return instance;
}
}  // namespace

void set_log_level(LogLevel level) {
  static const spdlog::level::level_enum map[] = {
      spdlog::level::debug, spdlog::level::info, spdlog::level::warn, spdlog::level::err, spdlog::level::off};
  logger()->set_level(map[static_cast<int>(level)]);
}

LogLevel parse_log_level(const std::string& name) {
  if (name == "debug") return LogLevel::debug;
  if (name == "info") return LogLevel::info;
  if (name == "warn") return LogLevel::warn;
  if (name == "error") return LogLevel::error;
  if (name == "off") return LogLevel::off;
  MDL_FAIL("[log] unknown log level '", name, "'; expected debug, info, warn, error or off");
}

void log_debug(const std::string& message) {
  logger()->debug(message);
}
void log_info(const std::string& message) {
  logger()->info(message);
}
void log_warn(const std::string& message) {
  logger()->warn(message);
}
void log_error(const std::string& message) {
  logger()->error(message);
}

bool log_warn_once(const std::string& message) {
  const char* rank = std::getenv("RANK");
  if (rank && *rank && std::string(rank) != "0") return false;
  static std::mutex mutex;
  static std::set<std::string> said;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (!said.insert(message).second) return false;
  }
  logger()->warn(message);
  return true;
}

}  // namespace mdl
