#include "mdl/core/threads.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>
#include <sched.h>

#include <algorithm>
#include <thread>

namespace mdl {

int available_cores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

ThreadConfig configure_threads(int threads) {
  ThreadConfig config;
  config.budget = threads > 0 ? threads : available_cores();
  config.torch_threads = 1;
  at::set_num_threads(config.torch_threads);
  // The selected libblas.so.3 may or may not be OpenBLAS: look the setter up instead of linking to it.
  using SetThreads = void (*)(int);
  auto set_blas = reinterpret_cast<SetThreads>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  if (set_blas) {
    set_blas(config.budget);
    config.blas_threads = config.budget;
  } else {
    config.blas_threads = 0;
  }
  using CoreName = char* (*)();
  if (auto core_name = reinterpret_cast<CoreName>(dlsym(RTLD_DEFAULT, "openblas_get_corename")))
    config.blas_kernels = core_name();
  return config;
}

}  // namespace mdl
