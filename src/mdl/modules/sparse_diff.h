// Sparse fine-tuning (Ansell et al., 2022, lottery-ticket sparse fine-tuning; Guo et al., 2021, diff
// pruning): a difference vector on a chosen subset of a weight's entries. Entries are chosen by the
// magnitude of their change after a short dense warm-up, or by a Fisher score (mean squared gradient).
// A module stores `indices` (flat, int64) and `values`, so it is small on disk; it merges exactly.
#pragma once

#include <functional>
#include <map>
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "mdl/modules/site_module.h"

namespace mdl {

template <class T>
class FieldList;

class ModelImpl;

/// Sparse fine-tuning settings.
struct SparseOptions {
  double density = 0.01;  ///< fraction of each targeted weight's entries that are trainable
};
void to_json(nlohmann::json& j, const SparseOptions& o);
void from_json(const nlohmann::json& j, SparseOptions& o);
/// The fields of SparseOptions: JSON keys, defaults and meanings (core/fields.h).
const FieldList<SparseOptions>& sparse_fields();
/// Throws naming the field when a value is out of its range (its field list runs it after reading).
void validate(const SparseOptions& o);

/// A sparse difference at one linear site: y = (W + scatter(indices, values)) x + b.
class SparseDiffImpl : public SiteModule {
 public:
  /// `indices`: flat positions into the (out, in) weight, sorted and unique.
  SparseDiffImpl(SiteLinearImpl& base, at::Tensor indices);
  at::Tensor forward(const at::Tensor& input, const at::Tensor& current) override;
  std::string type() const override { return "sparse"; }
  bool can_merge() const override { return true; }
  void merge() override;
  void unmerge() override;
  /// The dense (out, in) difference.
  at::Tensor delta_weight() const;
  at::Tensor indices;  // (K) int64 buffer
  at::Tensor values;   // (K) trainable

 private:
  SiteLinearImpl* base_;  // owned by the model
  int64_t out_, in_;
};
TORCH_MODULE(SparseDiff);

/// The top `density` fraction of `scores` (any shape) as sorted flat indices (at least one).
at::Tensor select_top_indices(const at::Tensor& scores, double density);

/// Scores from a dense warm-up: |W_tuned - W_base| for every linear site of `base` present in `tuned`
/// (both models of the same architecture).
std::map<std::string, at::Tensor> change_scores(const ModelImpl& base, const ModelImpl& tuned);

/// Fisher scores: the mean squared gradient of each linear site's weight over `batches` losses
/// (`loss_of(i)` builds batch i's scalar loss with `model`). The model's requires_grad flags are restored.
std::map<std::string, at::Tensor> fisher_scores(ModelImpl& model, int64_t batches,
                                                const std::function<at::Tensor(int64_t)>& loss_of);

}  // namespace mdl
