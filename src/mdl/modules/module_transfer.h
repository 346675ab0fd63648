// Moving a trained module from a teacher model to a smaller student of the same family (Klimaszewski et
// al., "Is Modularity Transferable?", LREC-COLING 2024): the student's module is initialised from the
// teacher's, then trained as usual. Student layer l takes teacher layer k l (skip) or the mean of teacher
// layers k l .. k l + k - 1 (avg); sites outside the layers (a head, the embeddings) are copied. When the
// student is narrower (prune-and-align), each student feature of a site takes the teacher feature its
// activations correlate with most under a one-to-one assignment (the Hungarian method over Pearson
// correlations of the two models' activations on the same inputs), and the module's weights are sliced
// along those features: LoRA A columns and B rows, an adapter's down-projection columns and up-projection
// rows, (IA)^3, BitFit and LayerNorm vectors. Which axis of which parameter runs along a site's inputs or
// outputs is the module-type table's (ModuleType::feature_axes); types without it are refused.
//
// Differences from the paper's code, on purpose: avg is a true mean (its code divides the sum of the
// first k - 1 layers by k without adding the last; `avg_reference` reproduces that), and each axis is
// aligned by the activations of its own space: a projection's input features by the site's inputs, its
// output features by its outputs (the paper's code slices LoRA's B rows with the input hidden states'
// assignment, which is only defined where a projection's output is the hidden size too).
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "mdl/backbones/model.h"
#include "mdl/modules/module_set.h"

namespace mdl {

class Tokenizer;

/// How a module moves.
struct TransferOptions {
  std::string method = "skip";  ///< skip | avg | prune-align (skip's layer map, features aligned)
  int64_t k = 0;                ///< teacher layers per student layer; 0: teacher layers / student layers
  /// avg as the paper's code computes it: (W_{kl} + ... + W_{kl+k-2}) / k, the last layer left out
  bool avg_reference = false;
};

/// Student layer l's teacher layers (skip and prune-align: {k l}; avg: {k l, ..., k l + k - 1}); throws
/// naming the counts when k is 0 and they are no whole multiple, or when k reaches past the teacher.
std::vector<std::vector<int64_t>> transfer_layer_map(int64_t teacher_layers, int64_t student_layers,
                                                     const TransferOptions& options);

/// `site` with its layer index (the first all-digit component: "model.layers.3.mlp" has 3) replaced by
/// `to`; `site` itself when it has none.
std::string site_in_layer(const std::string& site, int64_t to);

/// The layer index in a site's or parameter's name (its first all-digit component), -1 when it has none.
int64_t layer_in_name(const std::string& name);

/// Which teacher feature each student feature of a site takes: input[i] is student input feature i's
/// teacher feature (output likewise); empty: that side is kept in order (equal widths). `*_r`: the mean
/// correlation of the assigned pairs (NaN when not measured).
struct FeatureMap {
  std::vector<int64_t> input, output;
  double input_r = std::nan(""), output_r = std::nan("");
};
/// Feature maps by student site name.
using Alignment = std::map<std::string, FeatureMap>;

/// One batch both models see: the same texts in each one's tokens, or the same images. `keep` (B, P),
/// P at most either's length, marks the positions whose activations pair up (the same token in both
/// tokenizations, not padding); undefined: every position pairs up (images; both lengths equal).
struct PairedBatch {
  ModelInput teacher, student;
  at::Tensor keep;
};

/// `keep` for texts tokenised by each model: position p pairs up when it is real in both (masks (B, T))
/// and both tokens are the same once their word markers ("▁", "Ġ", "##") are dropped. Positions after the
/// first difference rarely match: this is a position-by-position comparison, as the paper's.
at::Tensor matching_positions(const at::Tensor& teacher_ids, const at::Tensor& teacher_mask,
                              const Tokenizer& teacher_tokenizer, const at::Tensor& student_ids,
                              const at::Tensor& student_mask, const Tokenizer& student_tokenizer);

/// The teacher site each student site of a module takes its part from, for `sites` (teacher module sites)
/// under options' layer map: student site -> teacher sites (one, or k for avg), in student forward order.
std::vector<std::pair<std::string, std::vector<std::string>>> transfer_site_map(
    const ModelImpl& teacher, const ModelImpl& student, const std::vector<std::string>& sites,
    const TransferOptions& options);

/// Prune-and-align's assignment: both models run over `batches` (no gradients, the backbones alone), the
/// activations at each student site of `site_map` and at its first teacher site are kept at the paired
/// positions, and every side whose widths differ is aligned (at least 2 paired positions are needed);
/// with `equal_widths`, sides of equal widths too (a student of the teacher's size trained apart, whose
/// features are the teacher's in another order at best).
/// Cost: every listed site's activations are held until the end (paired positions x (input + output
/// width) floats per site and model, so a few thousand positions are the scale for real widths), and each
/// aligned side is one Hungarian assignment, O(w^3) in the teacher's width w (~1e9 steps at w = 1024).
Alignment measure_alignment(ModelImpl& teacher, ModelImpl& student,
                            const std::vector<std::pair<std::string, std::vector<std::string>>>& site_map,
                            const std::vector<PairedBatch>& batches, bool equal_widths = false);

/// The teacher's module `module` (read for `teacher`) as a module for `student`: its config (with the
/// type's options_for_width when the hidden sizes differ), the student's sites and their tensors, mapped
/// by layer and sliced by `alignment` (which must cover every side whose widths differ). `report` (if
/// given) receives what was mapped: the layer map, each student site's teacher sites, the sliced widths.
ModuleFiles transfer_module(const ModuleFiles& module, const ModelImpl& teacher, const ModelImpl& student,
                            const TransferOptions& options, const Alignment& alignment = {},
                            nlohmann::json* report = nullptr);

}  // namespace mdl
