// Mixed precision: within an AutocastGuard, matrix products run in a lower precision (bfloat16 on CPU,
// bfloat16 or float16 on CUDA) while weights, reductions and the loss stay float32, as torch.autocast
// does. The guard restores the previous state on exit, so guards nest.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <string>

namespace mdl {

/// "fp32" (no autocast), "bf16" or "fp16" (CUDA only); an unknown name is an error naming the choices.
c10::ScalarType autocast_dtype(const std::string& precision);

class AutocastGuard {
 public:
  /// Enables autocast to `dtype` for `device`'s type; kFloat leaves everything as it is.
  AutocastGuard(c10::Device device, c10::ScalarType dtype);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool active_ = false, cuda_ = false, was_enabled_ = false;
  c10::ScalarType was_dtype_ = c10::kFloat;
};

}  // namespace mdl
