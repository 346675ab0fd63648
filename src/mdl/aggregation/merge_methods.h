// Parameter aggregation (the survey's merging): pure functions on one tensor name's values across the
// inputs, so callers stream whole checkpoints, task vectors and modules tensor by tensor.
//
// With a base, every method but linear and slerp works on task vectors tau_i = theta_i - base and
// returns base + lambda * merged(tau); without a base the inputs are taken as task vectors already.
//   linear           sum w_i theta_i / sum w_i (model soups; `normalize` false: plain weighted sum)
//   task_arithmetic  base + lambda sum w_i tau_i (negative weights negate a task)
//   ties             trim each tau_i to its top-`density` entries by magnitude, elect a sign per entry,
//                    average the entries that agree (disjoint mean)
//   dare_linear      drop each entry with probability 1 - density and rescale, then a weighted sum
//   dare_ties        DARE, then TIES' sign election and disjoint mean
//   magnitude_prune  trim each tau_i to its top-`density` entries, then a weighted sum
//   slerp            spherical interpolation of two inputs at t (linear when nearly parallel)
// PEFT and mergekit differ (see MergeConvention); mdl follows mergekit by default, because its TIES
// divisor (the agreeing weights) keeps the scale of weighted inputs and its DARE rescaling keeps each
// tensor's L1 norm.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <vector>

namespace mdl {

/// Where PEFT and mergekit disagree.
enum class MergeConvention {
  mergekit,  ///< TIES: sign of the weighted sum, divide by the sum of agreeing weights; DARE: keep the L1
             ///< norm
  peft,      ///< TIES: sign of the unweighted sum, divide by the count of agreeing entries; DARE: 1 / density
};

/// How to merge.
struct MergeOptions {
  std::string method = "linear";  ///< see above, plus cat | svd for LoRA modules
  std::vector<double> weights;    ///< one per input; empty: 1 each
  double density = 1.0;           ///< ties, dare_*, magnitude_prune: fraction of entries kept
  double lambda = 1.0;            ///< scale of the merged task vector
  bool normalize = true;          ///< linear: divide by the sum of weights
  double t = 0.5;                 ///< slerp: 0 = first input, 1 = second
  int64_t rank = 0;               ///< svd: target rank (0: the largest input rank)
  MergeConvention convention = MergeConvention::mergekit;
  uint64_t seed = 0;  ///< dare: with the tensor's name, fixes the drop mask
};
void to_json(nlohmann::json& j, const MergeOptions& o);
/// Checks the method and ranges, naming the field.
void validate(const MergeOptions& o, size_t inputs);

/// Merges one tensor's values across inputs (all the same shape); `base` may be undefined. `name` seeds
/// DARE's mask (with options.seed), so a tensor's result does not depend on the order of the stream.
/// Tensors above 1M entries are merged in blocks of rows (trim thresholds still over the whole tensor;
/// DARE masks, and mergekit's L1 rescaling, per block), so temporaries stay small.
at::Tensor merge_tensors(const std::vector<at::Tensor>& inputs, const at::Tensor& base,
                         const MergeOptions& options, const std::string& name);
/// As merge_tensors, handing the result to `sink` in blocks of whole rows, in order (one block for small
/// tensors), so a caller can write it out without holding the whole result.
void merge_tensors_into(const std::vector<at::Tensor>& inputs, const at::Tensor& base,
                        const MergeOptions& options, const std::string& name,
                        const std::function<void(const at::Tensor&)>& sink);

/// `tau` with all but its top-`density` fraction of entries (by magnitude) set to zero (entries tied
/// with the threshold magnitude are all kept).
at::Tensor trim_to_density(const at::Tensor& tau, double density);
/// The smallest magnitude `trim_to_density` keeps.
double magnitude_threshold(const at::Tensor& tau, double density);
/// `tau` with entries of magnitude below `threshold` set to zero.
at::Tensor trim_below(const at::Tensor& tau, double threshold);
/// DARE on one task vector: keep entries with probability `density`, rescale per the convention.
at::Tensor dare(const at::Tensor& tau, double density, MergeConvention convention, uint64_t seed);
/// SLERP between two tensors (flattened directions), linear when |cos| > 0.9995.
at::Tensor slerp(const at::Tensor& a, const at::Tensor& b, double t);

/// LoRA factors of one site: delta = scaling * B A.
struct LoraFactors {
  at::Tensor A;        ///< (r, in)
  at::Tensor B;        ///< (out, r)
  double scaling = 1;  ///< alpha / r, or alpha / sqrt(r) for rsLoRA: applied exactly once, here
};
/// Exact concatenation: A = [A_1; ...], B = [w_1 s_1 B_1, ...], scaling 1, rank = sum of ranks.
LoraFactors lora_cat(const std::vector<LoraFactors>& inputs, const std::vector<double>& weights);
/// A delta (out, in) factorised to rank r by SVD: B = U_r S_r, A = V_r^T, scaling 1.
struct SvdFactors {
  LoraFactors factors;
  double discarded_energy = 0;  ///< sum of the discarded sigma^2 / sum of all sigma^2
  double error = 0;             ///< ||delta - B A||_F = sqrt(sum of the discarded sigma^2)
};
SvdFactors lora_svd(const at::Tensor& delta, int64_t rank);

}  // namespace mdl
