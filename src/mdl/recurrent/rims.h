// RIMs (Goyal et al., "Recurrent Independent Mechanisms", 2021) as S2RMs' baseline: M GRU modules that
// compete for the views, each step's top-k active. The views are encoded with their locations and a null
// view (zeros) is added; a module's attention to the null view is how little it wants input, so the k
// modules with the least attention there are active. Active modules read the real views, step their cells
// and read every module (all-to-all attention); the others keep their state. decode(p) reads all modules:
// MLP([h_1, ..., h_M, p]).
#pragma once

#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>

#include "mdl/modularity/group_linear.h"
#include "mdl/recurrent/module_communication.h"
#include "mdl/recurrent/module_gru.h"
#include "mdl/recurrent/world_model.h"

namespace mdl {

class RimsImpl : public WorldModelImpl {
 public:
  explicit RimsImpl(const WorldModelOptions& options);
  at::Tensor initial_state(int64_t batch) const override;
  at::Tensor step(const Views& views, const at::Tensor& state, StepTrace* trace = nullptr) override;
  at::Tensor decode(const at::Tensor& state, const at::Tensor& queries) override;
  const WorldModelOptions& options() const override { return options_; }

 private:
  WorldModelOptions options_;
  torch::nn::Sequential view_encoder{nullptr}, decoder{nullptr};
  GroupLinear query{nullptr};
  ModuleCommunication communication{nullptr};
  torch::nn::Linear key{nullptr}, value{nullptr};
  ModuleGru cells{nullptr};
};
TORCH_MODULE(Rims);

}  // namespace mdl
