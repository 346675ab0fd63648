// Running the real `mdl serve` on 127.0.0.1 for the serving tests, and talking to it (cpp-httplib).
#pragma once

#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "test_util.h"

namespace mdl::test {

/// A started `mdl serve`: its pid and the port it listens on (0 if it did not start).
struct Process {
  pid_t pid = -1;
  int port = 0;
};

/// Starts `mdl serve --model MODEL --modules MODULES` on any free port, plus `extra` flags; returns once it
/// listens (the port file appears) or has exited. Its stderr goes to `stderr_file` when given.
inline Process start_server(const std::string& model, const std::string& modules,
                            const std::string& port_file, const std::vector<std::string>& extra = {},
                            const std::string& stderr_file = "") {
  namespace fs = std::filesystem;
  fs::remove(port_file);
  const char* bin = std::getenv("MDL_BIN");
  EXPECT_NE(bin, nullptr) << "MDL_BIN is not set (run through ctest)";
  std::vector<std::string> args = {"mdl",         "--log-level", "warn",        "serve",  "--model",
                                   model,         "--modules",   modules,       "--port", "0",
                                   "--port-file", port_file,     "--max-batch", "8"};
  args.insert(args.end(), extra.begin(), extra.end());
  Process p;
  std::fflush(nullptr);  // or the child's freopen writes this process's buffered output a second time
  p.pid = fork();
  if (p.pid == 0) {
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (!std::freopen("/dev/null", "w", stdout)) _exit(126);
    if (!stderr_file.empty() && !std::freopen(stderr_file.c_str(), "w", stderr)) _exit(126);
    execv(bin, argv.data());
    _exit(127);
  }
  // The port file appears once the server listens; a server that failed to start has exited.
  EXPECT_TRUE(wait_until([&] { return fs::exists(port_file); }, p.pid)) << "mdl serve did not start";
  if (fs::exists(port_file)) p.port = std::stoi(read_file(port_file));
  return p;
}

/// Stops a server with SIGKILL and reaps it.
inline void kill_server(Process& p) {
  if (p.pid <= 0) return;
  kill(p.pid, SIGKILL);
  waitpid(p.pid, nullptr, 0);
  p.pid = -1;
}

/// Whether the server process is still running (not exited, not killed).
inline bool alive(const Process& p) {
  return p.pid > 0 && !child_exited(p.pid);
}

/// POSTs `body` to `path`; the parsed JSON reply (discarded if not JSON), its status in `status`.
inline nlohmann::json post(int port, const std::string& path, const std::string& body, int* status = nullptr,
                           const httplib::Headers& headers = {},
                           const std::string& content_type = "application/json") {
  httplib::Client c("127.0.0.1", port);
  c.set_read_timeout(120);
  auto r = c.Post(path.c_str(), headers, body, content_type.c_str());
  EXPECT_TRUE(r) << "no response from " << path;
  if (!r) return nlohmann::json();
  if (status) *status = r->status;
  return nlohmann::json::parse(r->body, nullptr, false);
}

inline nlohmann::json post(int port, const std::string& path, const nlohmann::json& body,
                           int* status = nullptr, const httplib::Headers& headers = {}) {
  return post(port, path, body.dump(), status, headers);
}

/// The server answers /health and a one-token completion: what every hostile request must leave intact.
inline bool serving(const Process& p) {
  if (!alive(p)) return false;
  httplib::Client c("127.0.0.1", p.port);
  c.set_read_timeout(120);
  auto h = c.Get("/health");
  if (!h || h->status != 200) return false;
  auto r = c.Post("/v1/completions", R"({"prompt": "a", "max_tokens": 1})", "application/json");
  return r && r->status == 200;
}

}  // namespace mdl::test
