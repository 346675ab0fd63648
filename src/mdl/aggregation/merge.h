// `mdl merge`: merging whole checkpoints and modules from files.
// - Checkpoints stream tensor by tensor: each input tensor is copied out of its file's mapping and the
//   pages released, the result written straight to the output file (declared up front), so peak resident
//   memory stays about one tensor per input, not the sum of the inputs.
// - Modules are loaded onto their base model. LoRA modules merge per site: `cat` stacks the factors
//   exactly (rank = sum of ranks); every other method merges the full deltas s_i B_i A_i (scaling applied
//   once, inputs of any rank, rsLoRA and DoRA included) and factorises back to a chosen rank by SVD,
//   reporting the discarded energy. Other module types merge parameter by parameter. The output is
//   written in the inputs' format.
#pragma once

#include <string>
#include <vector>

#include "mdl/aggregation/merge_methods.h"

namespace mdl {

/// What a merge did.
struct MergeReport {
  int64_t tensors = 0;  ///< tensors written
  int64_t output_bytes = 0;
  int64_t rank = 0;                 ///< LoRA output rank (largest site rank)
  double max_discarded_energy = 0;  ///< svd: the largest per-site fraction of sigma^2 dropped
  double max_svd_error = 0;         ///< svd: the largest per-site ||delta - BA||_F
  std::string format;               ///< checkpoint | native | peft | adapterhub
};

/// Merges Hugging Face checkpoint directories into `out` (config and tokenizer files of the first input);
/// `base` (optional) is the checkpoint the task vectors are taken against.
MergeReport merge_checkpoints(const std::vector<std::string>& inputs, const std::string& base,
                              const MergeOptions& options, const std::string& out);

/// Merges module directories (native, PEFT or AdapterHub) made for the checkpoint `model` into `out`.
MergeReport merge_modules(const std::string& model, const std::vector<std::string>& inputs,
                          const MergeOptions& options, const std::string& out);

/// True if `dir` holds a module (module.json or adapter_config.json), false for a checkpoint.
bool is_module_dir(const std::string& dir);

}  // namespace mdl
