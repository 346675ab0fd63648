// The backend of thin_gemm: one row-major sgemm. CMake compiles thin_gemm_dnnl.cpp (oneDNN found) or
// thin_gemm_none.cpp (not found); nothing else in mdl calls these.
#pragma once

#include <cstdint>

namespace mdl::detail {

/// Whether sgemm_row_major may be called.
bool sgemm_available();

/// C = alpha op(A) op(B) + beta C, all row-major, op = 'N' or 'T'; C (M, N), op(A) (M, K), op(B) (K, N).
void sgemm_row_major(char trans_a, char trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                     int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

}  // namespace mdl::detail
