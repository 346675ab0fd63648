// Hypernetwork-generated LoRA (HyperFormer, Karimi Mahabadi et al., 2021; HyperLoRA): one small network,
// shared by all targeted sites, maps [task embedding ; site embedding] to that site's LoRA factors A and B.
// Training learns the generator and the task embeddings; a new task gets a module from an embedding alone,
// and materialize() turns the generated weights into an ordinary LoRA module (to save, merge or serve).
#pragma once

#include <map>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>

#include "mdl/modules/site_module.h"

namespace mdl {

template <class T>
class FieldList;

/// Hypernetwork settings.
struct HyperLoraOptions {
  int64_t num_tasks = 1;  ///< learned task embeddings
  int64_t task_embedding_dim = 16;
  int64_t site_embedding_dim = 8;  ///< one learned embedding per targeted site (its layer and role)
  int64_t hidden = 64;             ///< generator width
  int64_t r = 4;                   ///< rank of the generated LoRA
  double alpha = 8;                ///< its alpha (scaling alpha / r)
};
void to_json(nlohmann::json& j, const HyperLoraOptions& o);
void from_json(const nlohmann::json& j, HyperLoraOptions& o);
/// The fields of HyperLoraOptions: JSON keys, defaults and meanings (core/fields.h).
const FieldList<HyperLoraOptions>& hyper_lora_fields();
/// Throws naming the field when a value is out of its range (its field list runs it after reading).
void validate(const HyperLoraOptions& o);

/// The shared generator: task and site embeddings, a trunk, and one A/B head per distinct site shape.
class HyperGeneratorImpl : public torch::nn::Module {
 public:
  HyperGeneratorImpl(const HyperLoraOptions& options, const std::vector<SiteInfo>& sites, uint64_t seed,
                     c10::TensorOptions dtype);
  /// A (r, in) and B (out, r) of site `index` for a task embedding (task_embedding_dim).
  std::pair<at::Tensor, at::Tensor> generate(const at::Tensor& task, int64_t index) const;
  /// The embedding used now: a learned task's row, or one set explicitly.
  at::Tensor current_task() const;
  void set_task(int64_t task);
  void set_task_embedding(const at::Tensor& embedding);
  HyperLoraOptions options;
  at::Tensor task_embeddings, site_embeddings, w1, b1;
  std::map<std::string, std::pair<at::Tensor, at::Tensor>> head_a, head_b;  // "in x out" -> (weight, bias)

 private:
  std::vector<SiteInfo> sites_;
  int64_t task_ = 0;
  at::Tensor explicit_task_;
};
TORCH_MODULE(HyperGenerator);

/// One site's generated LoRA.
class HyperLoraImpl : public SiteModule {
 public:
  HyperLoraImpl(const SiteInfo& site, int64_t index, std::shared_ptr<HyperGeneratorImpl> generator,
                bool owner);
  at::Tensor forward(const at::Tensor& input, const at::Tensor& current) override;
  std::string type() const override { return "hyper_lora"; }
  const std::shared_ptr<HyperGeneratorImpl>& generator() const { return generator_; }
  int64_t index() const { return index_; }

 private:
  int64_t index_;
  std::shared_ptr<HyperGeneratorImpl> generator_;
};
TORCH_MODULE(HyperLora);

}  // namespace mdl
