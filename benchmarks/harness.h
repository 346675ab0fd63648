// A small benchmark harness: benchmarks register a function that measures and reports rows; `mdl_bench`
// runs them all (or those matching a filter) and prints one table of figures and ratios measured in the
// same run, so a ratio never compares numbers from different machines or days.
#pragma once

#include <functional>
#include <string>
#include <vector>

namespace mdl::bench {

/// One line of the report.
struct Row {
  std::string group;  ///< the benchmark family, e.g. "backbone"
  std::string name;   ///< what was measured
  double value = 0;   ///< the figure
  std::string unit;   ///< its unit
  std::string note;   ///< a ratio against the baseline measured in the same run, or context
};

/// Receives rows as a benchmark produces them.
class Report {
 public:
  void add(Row row);
  const std::vector<Row>& rows() const { return rows_; }

 private:
  std::vector<Row> rows_;
};

/// Settings every benchmark sees.
struct Settings {
  bool quick = false;        ///< fewer repetitions and smaller sizes (smoke runs)
  double min_seconds = 0.5;  ///< repeat each measurement until it took at least this long
};

/// Registers a benchmark; returns true so it can initialise a static.
bool register_benchmark(const std::string& name, std::function<void(const Settings&, Report&)> fn);

/// Seconds per call of a repeated measurement.
struct Timing {
  double median = 0;   ///< the median call
  double fastest = 0;  ///< the fastest call: what the work costs when nothing else on the machine interferes
  Timing() = default;
  Timing(double seconds) : median(seconds), fastest(seconds) {}  // NOLINT: one figure is both
  Timing(double median_s, double fastest_s) : median(median_s), fastest(fastest_s) {}
};

/// Times `fn`: `warmup` calls, then repeated until `min_seconds` and at least `min_runs` runs.
Timing time_runs(const std::function<void()>& fn, const Settings& settings, int warmup = 1, int min_runs = 3);

/// Median seconds per call of `fn` (one warm-up call, then repeated until `min_seconds` and >= 3 runs).
double time_it(const std::function<void()>& fn, const Settings& settings);

/// Peak resident memory of this process so far, in bytes (from /proc/self/status VmHWM).
long peak_rss_bytes();

}  // namespace mdl::bench

#define MDL_BENCHMARK(name, fn) static bool mdl_bench_##name = ::mdl::bench::register_benchmark(#name, fn)

namespace mdl::bench {

/// A measurement run in a fresh child process (so its peak memory is its own): returns its Timing (seconds
/// per call).
bool register_child(const std::string& name, std::function<Timing(const Settings&)> fn);

/// Result of a child run.
struct ChildResult {
  double seconds = 0;     ///< what the child's function returned (the median call)
  double fastest = 0;     ///< the fastest call, where the child's function timed several
  long peak_rss = 0;      ///< the child's peak resident memory (bytes)
  long baseline_rss = 0;  ///< its resident memory when the function called mark_baseline()
  long peak_tensor = 0;   ///< most bytes live tensors held since mark_baseline() (max_memory_allocated)
};

/// Runs child measurement `name` in a new process of this executable.
ChildResult run_child(const std::string& name, const Settings& settings);

/// Inside a child: records the current resident memory as the baseline (e.g. after loading the model) and
/// starts the peak of live tensor bytes there.
void mark_baseline();

}  // namespace mdl::bench

#define MDL_BENCHMARK_CHILD(name, fn) static bool mdl_child_##name = ::mdl::bench::register_child(#name, fn)
