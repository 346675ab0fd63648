#include "mdl/core/error.h"
#include "mdl/core/thin_gemm_backend.h"

namespace mdl::detail {

bool sgemm_available() {
  return false;
}

void sgemm_row_major(char, char, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                     int64_t, float, float*, int64_t) {
  MDL_FAIL("[thin_gemm] mdl was built without oneDNN; install libdnnl-dev and rebuild");
}

}  // namespace mdl::detail
