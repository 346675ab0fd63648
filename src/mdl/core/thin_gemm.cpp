#include "mdl/core/thin_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <cblas.h>

#include <algorithm>

#include "mdl/core/error.h"
#include "mdl/core/thin_gemm_backend.h"

namespace mdl {
namespace {

thread_local uint64_t backend_calls = 0;

// The largest small dimension sent to the backend. Past it the product is an ordinary GEMM, which
// OpenBLAS runs on every BLAS thread (the backend runs on torch's one).
constexpr int64_t kThinMax = 64;

// A row-major operand as sgemm takes it: the data, 'N' or 'T', and the leading dimension.
struct Operand {
  at::Tensor t;  // keeps a contiguous copy alive when one was needed
  char trans = 'N';
  int64_t ld = 1;
};

Operand operand(const at::Tensor& m) {
  const int64_t rows = m.size(0), cols = m.size(1);
  if (m.stride(1) == 1 && m.stride(0) >= std::max<int64_t>(cols, 1)) return {m, 'N', m.stride(0)};
  if (m.stride(0) == 1 && m.stride(1) >= std::max<int64_t>(rows, 1)) return {m, 'T', m.stride(1)};
  at::Tensor c = m.contiguous();
  return {c, 'N', std::max<int64_t>(cols, 1)};
}

bool eligible(const at::Tensor& a, const at::Tensor& b) {
  if (!thin_gemm_accelerated() || !a.device().is_cpu() || !b.device().is_cpu()) return false;
  if (a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat) return false;
  if (at::GradMode::is_enabled() && (a.requires_grad() || b.requires_grad()))
    return false;  // autograd records at:: ops
  // Autocast lowers at:: products: leave them to it, unless the caller has switched it off here.
  if (at::autocast::is_cpu_enabled() &&
      !c10::impl::tls_is_dispatch_key_excluded(c10::DispatchKey::AutocastCPU))
    return false;
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  return m > 0 && k > 0 && n > 0 && std::min({m, k, n}) <= kThinMax;
}

void check(const char* where, const at::Tensor& a, const at::Tensor& b) {
  MDL_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "[", where,
            "] expected a (M, K) and b (K, N), got ", shape_str(a.sizes().vec()), " and ",
            shape_str(b.sizes().vec()));
}

// c = alpha a b + beta c through the backend; c row-major with unit column stride.
void backend_gemm(const at::Tensor& a, const at::Tensor& b, double alpha, double beta, at::Tensor& c) {
  const Operand oa = operand(a), ob = operand(b);
  thin_sgemm(oa.trans, ob.trans, a.size(0), b.size(1), a.size(1), static_cast<float>(alpha),
             oa.t.data_ptr<float>(), oa.ld, ob.t.data_ptr<float>(), ob.ld, static_cast<float>(beta),
             c.data_ptr<float>(), c.stride(0));
}

}  // namespace

void thin_sgemm(char trans_a, char trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  MDL_CHECK((trans_a == 'N' || trans_a == 'T') && (trans_b == 'N' || trans_b == 'T'),
            "[thin_sgemm] trans must be 'N' or 'T', got '", trans_a, "' and '", trans_b, "'");
  if (detail::sgemm_available()) {
    // oneDNN takes its thread count from OpenMP, which a thread made outside torch (a server worker) has
    // at the default of one per core: set it to torch's count first, as torch's own kernels do.
    at::internal::lazy_init_num_threads();
    ++backend_calls;
    detail::sgemm_row_major(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  cblas_sgemm(CblasRowMajor, trans_a == 'T' ? CblasTrans : CblasNoTrans,
              trans_b == 'T' ? CblasTrans : CblasNoTrans, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(k), alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta, c,
              static_cast<int>(ldc));
}

bool thin_gemm_accelerated() {
  return detail::sgemm_available();
}

uint64_t thin_gemm_backend_calls() {
  return backend_calls;
}

at::Tensor thin_mm(const at::Tensor& a, const at::Tensor& b, double alpha) {
  check("thin_mm", a, b);
  if (!eligible(a, b)) return alpha == 1.0 ? at::mm(a, b) : at::mm(a, b).mul_(alpha);
  at::Tensor c = at::empty({a.size(0), b.size(1)}, a.options());  // (M, N)
  backend_gemm(a, b, alpha, 0.0, c);
  return c;
}

at::Tensor thin_addmm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, double alpha) {
  check("thin_addmm", a, b);
  MDL_CHECK(c.dim() == 2 && c.size(0) == a.size(0) && c.size(1) == b.size(1), "[thin_addmm] c must be ",
            shape_str({a.size(0), b.size(1)}), ", got ", shape_str(c.sizes().vec()));
  if (!eligible(a, b) || c.scalar_type() != at::kFloat || !c.device().is_cpu() ||
      (at::GradMode::is_enabled() && c.requires_grad()))
    return at::addmm(c, a, b, 1.0, alpha);
  at::Tensor out = c.clone(at::MemoryFormat::Contiguous);  // (M, N)
  backend_gemm(a, b, alpha, 1.0, out);
  return out;
}

void thin_addmm_(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, double alpha) {
  check("thin_addmm_", a, b);
  MDL_CHECK(c.dim() == 2 && c.size(0) == a.size(0) && c.size(1) == b.size(1), "[thin_addmm_] c must be ",
            shape_str({a.size(0), b.size(1)}), ", got ", shape_str(c.sizes().vec()));
  const bool row_major = c.stride(1) == 1 && c.stride(0) >= std::max<int64_t>(c.size(1), 1);
  if (!eligible(a, b) || c.scalar_type() != at::kFloat || !c.device().is_cpu() || !row_major ||
      (at::GradMode::is_enabled() && c.requires_grad())) {
    c.addmm_(a, b, 1.0, alpha);
    return;
  }
  backend_gemm(a, b, alpha, 1.0, c);
}

}  // namespace mdl
