// The LoRAs at one site stacked for batches in which every example uses its own LoRA (Punica's BGMV,
// S-LoRA): A^T (N + 1, in, r_max) and B^T (N + 1, r_max, out) with each LoRA's scaling apart, smaller ranks
// padded with zeros and a last all-zero entry for "no LoRA". A batch then costs two small products per
// row and site, read straight from the bank, however many distinct LoRAs it holds. The factors are
// stored transposed so that a decoding row's products are two runs of contiguous multiply-adds.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <vector>

namespace mdl {

class LoraBank {
 public:
  struct Factors {
    at::Tensor A, B;  ///< (r, in), (out, r)
    double scaling = 1.0;
  };
  /// Restacks when the LoRAs (identity, or weights changed in place) or the storage differ from the last
  /// call's. `storage`: float32, or float16 (half the bytes; the rank padded to a multiple of 8 on CPU).
  void update(const std::vector<Factors>& loras, at::ScalarType storage = at::kFloat);
  /// Index of the all-zero entry (rows without a LoRA in a slot).
  int64_t none() const { return n_; }
  /// current + scale[b] * B[idx[b]] A[idx[b]] x[b] for every row b. x (B, T, in) or (B, in),
  /// current (B, T, out) or (B, out), idx (B) int64, scale (B) in current's dtype.
  at::Tensor apply(const at::Tensor& x, const at::Tensor& current, const at::Tensor& idx,
                   const at::Tensor& scale) const;

 private:
  std::vector<const void*> ids_;   // the stacked A tensors' storage, to notice a different set
  std::vector<int64_t> versions_;  // their in-place versions, to notice changed weights
  int64_t n_ = 0;
  at::ScalarType storage_ = at::kFloat;
  at::Tensor at_, bt_;           // A^T (N + 1, in, r_max), B^T (N + 1, r_max, out)
  std::vector<double> scaling_;  // (N + 1); kept out of B, so float16 storage holds B's own values
};

}  // namespace mdl
