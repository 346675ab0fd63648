// Matrix products with one small dimension (a LoRA rank), as LoRA's training nodes take them: x A^T,
// g B, (g B)^T x, (x A^T)^T g, W + s B A. OpenBLAS runs these far below its GEMM speed (packing the
// large operand dominates); oneDNN's sgemm, whose kernels are generated for the machine's instruction
// set, takes them 1.5-2.5x faster on one thread (measured on the small preset's shapes, N = 1024 rows,
// r = 16: g B 0.07 vs 0.14 ms, (g B)^T x 0.06 vs 0.13, W + s B A 0.04 vs 0.12). CPU float32 operands
// go there when mdl is built with oneDNN (CMake finds libdnnl-dev); every other device, dtype or
// build takes the same product through at::, so the code runs unchanged on CUDA.
#pragma once

#include <ATen/core/Tensor.h>

namespace mdl {

/// alpha * a @ b: a (M, K), b (K, N), either may be a transposed view; returns a contiguous (M, N).
at::Tensor thin_mm(const at::Tensor& a, const at::Tensor& b, double alpha = 1.0);

/// c + alpha * a @ b as a new contiguous (M, N) tensor; c is left as it is.
at::Tensor thin_addmm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, double alpha);

/// c += alpha * a @ b in place; c (M, N).
void thin_addmm_(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, double alpha);

/// The raw form, for callers that hold pointers (LoraBank's rows): C = alpha op(A) op(B) + beta C, all
/// row-major float32 in CPU memory, op = 'N' or 'T'; C (M, N), op(A) (M, K), op(B) (K, N). oneDNN when
/// built with it, else the BLAS's cblas_sgemm.
void thin_sgemm(char trans_a, char trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

/// Whether CPU float32 products go through oneDNN in this build (false: at:: everywhere).
bool thin_gemm_accelerated();

/// Products the calling thread has sent to oneDNN so far: what tests and benchmarks read to see that a
/// product took the backend (its bits may equal at::'s on some CPUs, so they cannot tell).
uint64_t thin_gemm_backend_calls();

}  // namespace mdl
