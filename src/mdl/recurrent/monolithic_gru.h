// The monolithic baseline of S2RMs: one GRU over the mean of the encoded views (each encoded with its
// location; padded views left out), decoded at a location as MLP([h, p]). Its state is (B, 1, H).
#pragma once

#include <torch/nn/modules/container/sequential.h>

#include "mdl/recurrent/module_gru.h"
#include "mdl/recurrent/world_model.h"

namespace mdl {

class MonolithicGruImpl : public WorldModelImpl {
 public:
  explicit MonolithicGruImpl(const WorldModelOptions& options);
  at::Tensor initial_state(int64_t batch) const override;
  at::Tensor step(const Views& views, const at::Tensor& state, StepTrace* trace = nullptr) override;
  at::Tensor decode(const at::Tensor& state, const at::Tensor& queries) override;
  const WorldModelOptions& options() const override { return options_; }

 private:
  WorldModelOptions options_;
  torch::nn::Sequential view_encoder{nullptr}, decoder{nullptr};
  ModuleGru cell{nullptr};
};
TORCH_MODULE(MonolithicGru);

}  // namespace mdl
