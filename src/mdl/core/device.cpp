#include "mdl/core/device.h"

#include <torch/cuda.h>

#include "mdl/core/error.h"

namespace mdl {

c10::Device parse_device(const std::string& name) {
  if (name == "cpu") return c10::Device(c10::kCPU);
  if (name.rfind("cuda", 0) == 0) {
    MDL_CHECK(torch::cuda::is_available(), "[device] '", name,
              "' requested but CUDA is not available (this libtorch has no CUDA, or no GPU is visible); "
              "use --device cpu");
    int index = 0;
    if (name.size() > 4) {
      MDL_CHECK(name[4] == ':' && name.size() > 5, "[device] cannot parse '", name,
                "'; expected cuda or cuda:N");
      try {
        index = std::stoi(name.substr(5));
      } catch (const std::exception&) {
        MDL_FAIL("[device] cannot parse '", name, "'; expected cuda or cuda:N");
      }
      MDL_CHECK(index >= 0 && index < static_cast<int>(torch::cuda::device_count()), "[device] '", name,
                "': only ", torch::cuda::device_count(), " CUDA device(s) visible");
    }
    return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  MDL_FAIL("[device] unknown device '", name, "'; expected cpu, cuda or cuda:N");
}

c10::ScalarType parse_dtype(const std::string& name) {
  if (name == "f32" || name == "float32" || name == "float") return c10::kFloat;
  if (name == "bf16" || name == "bfloat16") return c10::kBFloat16;
  if (name == "f16" || name == "float16" || name == "half") return c10::kHalf;
  if (name == "f64" || name == "float64") return c10::kDouble;
  MDL_FAIL("[dtype] unknown dtype '", name, "'; expected f32, bf16 or f16");
}

std::string dtype_name(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::kFloat:
      return "f32";
    case c10::kBFloat16:
      return "bf16";
    case c10::kHalf:
      return "f16";
    case c10::kDouble:
      return "f64";
    default:
      return c10::toString(dtype);
  }
}

}  // namespace mdl
