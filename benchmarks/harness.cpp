#include "harness.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <string>

#include "mdl/core/cpu_allocator.h"
#include "mdl/core/threads.h"

namespace mdl::bench {
namespace {
std::vector<std::pair<std::string, std::function<void(const Settings&, Report&)>>>& registry() {
  static std::vector<std::pair<std::string, std::function<void(const Settings&, Report&)>>> r;
  return r;
}
}  // namespace

void Report::add(Row row) {
  std::printf("  %-12s %-52s %12.2f %-10s %s\n", row.group.c_str(), row.name.c_str(), row.value,
              row.unit.c_str(), row.note.c_str());
  std::fflush(stdout);
  rows_.push_back(std::move(row));
}

bool register_benchmark(const std::string& name, std::function<void(const Settings&, Report&)> fn) {
  registry().emplace_back(name, std::move(fn));
  return true;
}

Timing time_runs(const std::function<void()>& fn, const Settings& settings, int warmup, int min_runs) {
  using clock = std::chrono::steady_clock;
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> times;
  double total = 0;
  while (static_cast<int>(times.size()) < min_runs || total < settings.min_seconds) {
    auto t0 = clock::now();
    fn();
    double s = std::chrono::duration<double>(clock::now() - t0).count();
    times.push_back(s);
    total += s;
    if (times.size() >= 200) break;
  }
  std::sort(times.begin(), times.end());
  return {times[times.size() / 2], times.front()};
}

double time_it(const std::function<void()>& fn, const Settings& settings) {
  return time_runs(fn, settings).median;
}

namespace {
std::map<std::string, std::function<Timing(const Settings&)>>& children() {
  static std::map<std::string, std::function<Timing(const Settings&)>> c;
  return c;
}
long g_baseline = 0;
// A "Vm...:  N kB" line of /proc/self/status, in bytes (0 if absent).
long status_bytes(const char* field) {
  std::ifstream in("/proc/self/status");
  std::string line;
  const std::string key = std::string(field) + ":";
  while (std::getline(in, line))
    if (line.rfind(key, 0) == 0) return std::stol(line.substr(key.size())) * 1024;
  return 0;
}
int g_threads = 0;
}  // namespace

bool register_child(const std::string& name, std::function<Timing(const Settings&)> fn) {
  children()[name] = std::move(fn);
  return true;
}

void mark_baseline() {
  g_baseline = status_bytes("VmRSS");
  mdl::reset_cpu_peak_bytes();
}

ChildResult run_child(const std::string& name, const Settings& settings) {
  std::string cmd = "/proc/" + std::to_string(getpid()) + "/exe --child=" + name +
                    (settings.quick ? " --quick" : "") + " --threads=" + std::to_string(g_threads);
  FILE* pipe = popen(cmd.c_str(), "r");
  if (!pipe) throw std::runtime_error("cannot start child " + name);
  char buf[512];
  std::string out;
  while (fgets(buf, sizeof(buf), pipe)) out += buf;
  int status = pclose(pipe);
  ChildResult r;
  const size_t at = out.find("CHILD ");
  if (status != 0 || at == std::string::npos) throw std::runtime_error("child " + name + " failed: " + out);
  std::sscanf(out.c_str() + at, "CHILD %lf %lf %ld %ld %ld", &r.seconds, &r.fastest, &r.peak_rss,
              &r.baseline_rss, &r.peak_tensor);
  return r;
}

long peak_rss_bytes() {
  return status_bytes("VmHWM");
}

}  // namespace mdl::bench

int main(int argc, char** argv) {
  mdl::bench::Settings settings;
  std::string filter, child;
  int threads = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--quick")
      settings.quick = true, settings.min_seconds = 0.05;
    else if (a.rfind("--filter=", 0) == 0)
      filter = a.substr(9);
    else if (a.rfind("--threads=", 0) == 0)
      threads = std::stoi(a.substr(10));
    else if (a.rfind("--child=", 0) == 0)
      child = a.substr(8);
    else if (a == "--help" || a == "-h") {
      std::printf("usage: mdl_bench [--quick] [--filter=SUBSTRING] [--threads=N]\nbenchmarks:");
      for (auto& [name, fn] : mdl::bench::registry()) std::printf(" %s", name.c_str());
      std::printf("\n");
      return 0;
    } else {
      std::fprintf(stderr, "mdl_bench: unknown argument '%s' (try --help)\n", a.c_str());
      return 2;
    }
  }
  auto t = mdl::configure_threads(threads);
  mdl::install_cpu_allocator();
  mdl::bench::g_threads = threads;
  if (!child.empty()) {
    auto it = mdl::bench::children().find(child);
    if (it == mdl::bench::children().end()) return 2;
    const mdl::bench::Timing t = it->second(settings);
    std::printf("CHILD %.9f %.9f %ld %ld %ld\n", t.median, t.fastest, mdl::bench::peak_rss_bytes(),
                mdl::bench::g_baseline, static_cast<long>(mdl::cpu_allocator_stats().peak_bytes));
    return 0;
  }
  std::printf("mdl_bench: %d thread(s) (torch %d x OpenBLAS %d, %s kernels)%s\n", t.budget, t.torch_threads,
              t.blas_threads, t.blas_kernels.empty() ? "unknown" : t.blas_kernels.c_str(),
              settings.quick ? ", quick" : "");
  std::printf("  %-12s %-52s %12s %-10s %s\n", "group", "measurement", "value", "unit", "ratio / note");
  mdl::bench::Report report;
  int failures = 0;
  for (auto& [name, fn] : mdl::bench::registry()) {
    if (!filter.empty() && name.find(filter) == std::string::npos) continue;
    try {
      fn(settings, report);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "benchmark %s failed: %s\n", name.c_str(), e.what());
      ++failures;
    }
  }
  return failures ? 1 : 0;
}
