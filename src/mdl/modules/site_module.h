// A module: a computation function with parameters of its own, attached at one site of a frozen backbone
// (the survey's f_phi). The backbone's weights are never changed by a module's forward; merging them
// into the base weights is an explicit, reversible call.
#pragma once

#include <torch/nn/module.h>

#include <memory>
#include <string>
#include <vector>

#include "mdl/backbones/layers.h"
#include "mdl/core/site.h"
#include "mdl/routing/module_routing.h"
#include "mdl/routing/routing_context.h"

namespace mdl {

/// One module's part at one site.
class SiteModule : public torch::nn::Module {
 public:
  /// The site's new output from its input and the current output (base, or what earlier modules made of it).
  virtual at::Tensor forward(const at::Tensor& input, const at::Tensor& current) = 0;
  /// At a linear site where this module is the only one running: the projection (`weight` (out, in),
  /// `bias`) of `input` with this module applied. The default is forward() on the projection's output.
  virtual at::Tensor forward_linear(const at::Tensor& input, const at::Tensor& weight,
                                    const at::Tensor& bias);
  /// The module type ("lora", "ia3", "adapter").
  virtual std::string type() const = 0;
  /// Positions prepended at an attention_kv site (prefix tuning); 0 otherwise.
  virtual int64_t prefix_positions() const { return 0; }
  /// Whether merge() can fold this module into the base projection.
  virtual bool can_merge() const { return false; }
  /// Folds the module into the base layer it was created for (merge) or takes it out again (unmerge).
  /// Throws if unsupported.
  virtual void merge();
  virtual void unmerge();
  /// Modules this one runs itself (a fusion's members): skipped at this site while it is active.
  virtual const std::vector<const SiteModule*>& absorbs() const;
  /// A module whose change to the output is exactly scaling * B A x (plain LoRA) returns its factors, so
  /// heterogeneous batches can gather it (LoraBank); others return false.
  virtual bool low_rank(at::Tensor& A, at::Tensor& B, double& scaling) const { return false; }
};

class LoraBank;

/// The modules attached at one site, and its forward as Algorithm 1: route (which modules each row uses,
/// in order, weighted), compute each selected module on its rows, aggregate (each maps the row's current
/// output to a new one, its change weighted: additive modules (LoRA) sum, adapters stack in the row's
/// order). See routing/module_routing.h.
///
/// The route: without per-example choices, every row uses the active modules in attachment order, each at
/// its `scale` (0 = off, 1 = as trained); modules an active fusion runs are skipped here (the fusion runs
/// them). When the forward's routing context names modules per example, each example uses exactly its
/// modules (active flags aside), in the order it names them, with its scales: one batch mixes examples
/// with different modules, each module running once on the rows that chose it at a step.
///
/// Fast paths, each a special case of that dispatch, tested equal to it: one LoRA folded into its
/// projection (forward_linear); every chosen module a plain LoRA, at least two distinct: the gathered
/// LoRA bank (forward_gathered).
class AttachedModules : public SiteFunction {
 public:
  struct Entry {
    std::string name;
    std::shared_ptr<SiteModule> module;
    bool active = true;
    bool merged = false;  ///< folded into the base weights: skipped in forward
    double scale = 1.0;
  };
  at::Tensor forward(const at::Tensor& input, const at::Tensor& base) override;
  /// With one module running here at scale 1 (and no per-example routing), that module's forward_linear.
  at::Tensor forward_linear(const at::Tensor& input, const at::Tensor& weight,
                            const at::Tensor& bias) override;
  int64_t prefix_positions() const override;
  void set_training(bool on) override;
  std::vector<Entry>& entries() { return entries_; }
  /// Storage of the stacked LoRAs a batch of examples with different LoRAs reads (LoraBank): float32
  /// (default), or float16, which halves the bytes each decoding step reads at a relative rounding of
  /// 2^-11 on the LoRA factors (the serving engine's default). A setting of the site, not of a batch.
  void set_lora_bank_storage(at::ScalarType storage) { bank_storage_ = storage; }
  Entry* find(const std::string& name);

 private:
  /// The entries the route by active flags uses, in order: active, unmerged, scale != 0, not run by an
  /// active fusion.
  std::vector<Entry*> running();
  /// Algorithm 1's route for a batch of `rows`: entry indices per row, in order, with weights.
  ModuleRouting route(int64_t rows);
  /// Compute and aggregate: dispatch_in_order over the entries' modules.
  at::Tensor compute(const at::Tensor& input, const at::Tensor& base, const ModuleRouting& routing);
  /// The fast path when every module chosen here is a plain LoRA, at least two distinct ones, and no
  /// gradient is needed: one gathered low-rank product per step (Punica's BGMV); undefined otherwise.
  at::Tensor forward_gathered(const at::Tensor& input, const at::Tensor& base, const ModuleRouting& routing);
  std::vector<Entry> entries_;
  std::shared_ptr<LoraBank> bank_;
  at::ScalarType bank_storage_ = at::kFloat;
};

}  // namespace mdl
