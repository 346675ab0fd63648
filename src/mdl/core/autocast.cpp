#include "mdl/core/autocast.h"

#include <ATen/autocast_mode.h>

#include "mdl/core/error.h"

namespace mdl {

c10::ScalarType autocast_dtype(const std::string& precision) {
  if (precision == "fp32" || precision.empty()) return c10::kFloat;
  if (precision == "bf16") return c10::kBFloat16;
  if (precision == "fp16") return c10::kHalf;
  MDL_FAIL("[autocast] precision '", precision, "' is unknown; expected fp32, bf16 or fp16 (CUDA only)");
}

AutocastGuard::AutocastGuard(c10::Device device, c10::ScalarType dtype) {
  if (dtype == c10::kFloat) return;
  cuda_ = device.is_cuda();
  MDL_CHECK(cuda_ || dtype == c10::kBFloat16, "[autocast] CPU autocast supports bf16 only, got ",
            c10::toString(dtype));
  MDL_CHECK(cuda_ || device.is_cpu(), "[autocast] device ", device.str(),
            " has no autocast here; use cpu or cuda");
  if (cuda_) {
    was_enabled_ = at::autocast::is_enabled();
    was_dtype_ = at::autocast::get_autocast_gpu_dtype();
    at::autocast::set_autocast_gpu_dtype(dtype);
    at::autocast::set_enabled(true);
  } else {
    was_enabled_ = at::autocast::is_cpu_enabled();
    was_dtype_ = at::autocast::get_autocast_cpu_dtype();
    at::autocast::set_autocast_cpu_dtype(dtype);
    at::autocast::set_cpu_enabled(true);
  }
  at::autocast::increment_nesting();
  active_ = true;
}

AutocastGuard::~AutocastGuard() {
  if (!active_) return;
  // Leaving the outermost region drops the cached low-precision copies of the weights.
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  if (cuda_) {
    at::autocast::set_enabled(was_enabled_);
    at::autocast::set_autocast_gpu_dtype(was_dtype_);
  } else {
    at::autocast::set_cpu_enabled(was_enabled_);
    at::autocast::set_autocast_cpu_dtype(was_dtype_);
  }
}

}  // namespace mdl
