// The LoRAs at one site stacked for batches in which every example uses its own LoRA (Punica's BGMV,
// S-LoRA): A (N + 1, r_max, in) and B (N + 1, out, r_max), the scaling folded into B, smaller ranks
// padded with zeros and a last all-zero entry for "no LoRA". A batch then costs two gathers and two
// batched products per site, however many distinct LoRAs it holds, instead of one pair per LoRA.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace mdl {

class LoraBank {
 public:
  struct Factors {
    at::Tensor A, B;  ///< (r, in), (out, r)
    double scaling = 1.0;
  };
  /// Restacks when the LoRAs (identity, or weights changed in place) differ from the last call's.
  void update(const std::vector<Factors>& loras);
  /// Index of the all-zero entry (rows without a LoRA in a slot).
  int64_t none() const { return n_; }
  /// current + scale[b] * B[idx[b]] A[idx[b]] x[b] for every row b. x (B, T, in) or (B, in),
  /// current (B, T, out) or (B, out), idx (B) int64, scale (B) in current's dtype.
  at::Tensor apply(const at::Tensor& x, const at::Tensor& current, const at::Tensor& idx, const at::Tensor& scale) const;

 private:
  std::vector<const void*> ids_;     // the stacked A tensors' storage, to notice a different set
  std::vector<int64_t> versions_;    // their in-place versions, to notice changed weights
  int64_t n_ = 0;
  at::Tensor a_, b_;                 // (N + 1, r_max, in), (N + 1, out, r_max)
};

}  // namespace mdl
