#include "mdl/distributed/local_launch.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "mdl/core/error.h"

namespace mdl {

int launch_local_workers(int n, int threads) {
  std::vector<std::string> args;
  {
    std::ifstream in("/proc/self/cmdline", std::ios::binary);
    std::string a;
    while (std::getline(in, a, '\0')) args.push_back(a);
  }
  MDL_CHECK(!args.empty(), "[train] cannot read this process's command line");
  std::vector<std::string> child = {args[0]};
  const int budget = threads > 0 ? threads : static_cast<int>(std::thread::hardware_concurrency());
  child.push_back("--threads");
  child.push_back(std::to_string(std::max(1, budget / n)));
  for (size_t i = 1; i < args.size(); ++i) {
    if (args[i] == "--threads") {
      ++i;
      continue;
    }  // replaced by the per-worker share
    if (args[i] == "--nproc") {
      ++i;
      continue;
    }
    if (args[i].rfind("--nproc=", 0) == 0 || args[i].rfind("--threads=", 0) == 0) continue;
    child.push_back(args[i]);
  }
  int port = 0;
  {  // a free port for the rendezvous
    const int fd = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    MDL_CHECK(fd >= 0 && ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
                  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0,
              "[train] cannot find a free port for the workers' rendezvous");
    port = ntohs(addr.sin_port);
    close(fd);
  }
  std::vector<pid_t> pids;
  for (int r = 0; r < n; ++r) {
    const pid_t pid = fork();
    MDL_CHECK(pid >= 0, "[train] cannot start worker ", r);
    if (pid == 0) {
      setenv("RANK", std::to_string(r).c_str(), 1);
      setenv("LOCAL_RANK", std::to_string(r).c_str(), 1);
      setenv("WORLD_SIZE", std::to_string(n).c_str(), 1);
      setenv("MASTER_ADDR", "127.0.0.1", 1);
      setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
      std::vector<char*> argv;
      for (auto& a : child) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv("/proc/self/exe", argv.data());
      _exit(127);
    }
    pids.push_back(pid);
  }
  int failed = 0;
  for (int r = 0; r < n; ++r) {
    int status = 0;
    waitpid(pids[static_cast<size_t>(r)], &status, 0);
    if (!(WIFEXITED(status) && WEXITSTATUS(status) == 0)) {
      ++failed;
      std::fprintf(stderr, "[train] worker %d %s %d\n", r,
                   WIFSIGNALED(status) ? "killed by signal" : "exited with",
                   WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status));
    }
  }
  return failed;
}

}  // namespace mdl
