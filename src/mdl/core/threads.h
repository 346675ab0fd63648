// Thread budget. torch's intra-op pool and OpenBLAS's own pool multiply: measured on 2 cores, torch 2 x
// OpenBLAS 2 made a training step 2.7x slower than torch 1 x OpenBLAS 2. So mdl gives the whole budget
// to BLAS (where the time goes: GEMMs) and runs torch's element-wise kernels on one thread; the product
// torch x BLAS never exceeds the budget.
#pragma once

#include <string>

namespace mdl {

/// How a thread budget was split.
struct ThreadConfig {
  int budget = 1;         ///< total threads allowed (the --threads value, or the core count)
  int torch_threads = 1;  ///< torch intra-op threads
  int blas_threads = 1;   ///< OpenBLAS threads (0 if the BLAS in use is not OpenBLAS)
  /// OpenBLAS's kernels ("Haswell", "Cooperlake", ...; empty if not OpenBLAS). OpenBLAS picks them for the
  /// CPU unless OPENBLAS_CORETYPE names others; benchmark figures depend on them (AVX-512 kernels run this
  /// machine's GEMMs ~1.8x faster than Haswell's), so the benchmarks print them.
  std::string blas_kernels;
};

/// Number of cores usable by this process (sched affinity), at least 1.
int available_cores();

/// Applies a budget of `threads` total threads (<= 0: all available cores) and returns the split.
/// Safe to call more than once (e.g. a worker lowering its budget).
ThreadConfig configure_threads(int threads);

}  // namespace mdl
