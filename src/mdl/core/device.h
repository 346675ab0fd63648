// Device and dtype selection (`--device cpu|cuda[:N]`, `--dtype f32|bf16|f16`). Nothing else in mdl
// names a device: tensors follow the model's device.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <string>

namespace mdl {

/// Parses "cpu", "cuda" or "cuda:N"; throws if CUDA is requested but not available in this build.
c10::Device parse_device(const std::string& name);

/// Parses "f32|float32", "bf16|bfloat16", "f16|float16".
c10::ScalarType parse_dtype(const std::string& name);

/// Short name of a floating dtype: "f32", "bf16", "f16", "f64".
std::string dtype_name(c10::ScalarType dtype);

}  // namespace mdl
