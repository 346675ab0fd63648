// Hugging Face PEFT directories: `adapter_config.json` + `adapter_model.safetensors`, for LoRA (incl.
// rsLoRA, DoRA, rank_pattern / alpha_pattern, fan_in_fan_out, lora_bias) and (IA)^3. Tensor names carry no
// adapter name: `base_model.model.<module path>.lora_A.weight` (r, in), `.lora_B.weight` (out, r),
// `.lora_B.bias` (out), `.lora_magnitude_vector` (out), `.ia3_l` ((out, 1), or (1, in) feed-forward).
// Unknown config keys are ignored, as PEFT does.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <vector>

#include "mdl/io/safetensors.h"
#include "mdl/modules/module_set.h"

namespace mdl {

/// A PEFT directory read into mdl's terms.
struct PeftModule {
  ModuleConfig config;
  std::vector<std::string> sites;             ///< mdl site names, in file order
  std::map<std::string, at::Tensor> tensors;  ///< "<site>.<mdl parameter>" -> tensor
};

/// The weights file's `__metadata__` for module config `c`: {"format": "pt"} and, for a module with labels,
/// "mdl.labels" (a JSON array of the label names in index order): PEFT's and AdapterHub's files have no
/// field for them and their readers look only at the tensors, so they travel there.
std::map<std::string, std::string> module_file_metadata(const ModuleConfig& c);
/// The labels module_file_metadata wrote into `file` (empty when absent); throws naming the file when the
/// entry is not an array of strings.
std::vector<std::string> labels_in_metadata(const io::SafetensorsFile& file);

/// Reads `dir` for `model` (site names are resolved against it: HF paths with or without the body prefix).
PeftModule read_peft(const std::string& dir, const ModelImpl& model);

/// Writes module `name` of `set` as a PEFT directory (LoRA or (IA)^3).
void write_peft(const ModuleSet& set, const std::string& name, const std::string& dir);

}  // namespace mdl
