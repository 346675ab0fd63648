#include <oneapi/dnnl/dnnl.h>

#include "mdl/core/error.h"
#include "mdl/core/thin_gemm_backend.h"

namespace mdl::detail {

bool sgemm_available() {
  return true;
}

void sgemm_row_major(char trans_a, char trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                     int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const dnnl_status_t status = dnnl_sgemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  MDL_CHECK(status == dnnl_success, "[thin_gemm] oneDNN sgemm failed with status ", static_cast<int>(status),
            " for (", m, " x ", k, ") @ (", k, " x ", n, "), trans ", trans_a, trans_b, ", lda ", lda,
            ", ldb ", ldb, ", ldc ", ldc);
}

}  // namespace mdl::detail
