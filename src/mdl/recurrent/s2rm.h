// S2RMs (Rahaman et al., "Spatially Structured Recurrent Modules", ICLR 2021): M recurrent modules, each at
// a learned point s_m of a d_s-dimensional space; views and queries are mapped into the same space by a
// location encoder, and a truncated kernel K decides who meets whom. The paper's equations could not be
// read here (docs/ARCHITECTURE.md, "Recurrent world models"); this is the reconstruction of
// ../shared/SEED_PAPERS.md §4 with one change, marked (*):
//   e_v = enc(p_v) in [-1, 1]^d_s                        location encoder (MLP, tanh)
//   K_mv = K(s_m, e_v)                                    fn::truncated_kernel
//   alpha_mv = softmax_v(q_m . k_v / sqrt(dk) + log K_mv) input attention, over the views near m
//   active_m = sum_v K_mv > 0; u_m = sum_v alpha_mv val_v (active modules only)
//   h~ = GRU_m(u_m, h_m)                                  per-module cells, one batched product
//   h^_m = h~_m + sum_m' softmax_m'(q_m . k_m' / sqrt(dk) + log K(s_m, s_m')) v_m'   communication
//   h'_m = h^_m if active_m else h_m                      (*) a module with no view near it keeps its
//                                                         state exactly (as RIMs' inactive modules), where
//                                                         the reconstruction ran its GRU on u = 0
//   decode(p): w_m = K(s_m, e(p)) / sum_m' K(s_m', e(p)); r = sum_m w_m h'_m; MLP([r, e(p)])
#pragma once

#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>

#include "mdl/modularity/group_linear.h"
#include "mdl/recurrent/module_communication.h"
#include "mdl/recurrent/module_gru.h"
#include "mdl/recurrent/world_model.h"

namespace mdl {

class S2rmImpl : public WorldModelImpl {
 public:
  explicit S2rmImpl(const WorldModelOptions& options);
  at::Tensor initial_state(int64_t batch) const override;
  at::Tensor step(const Views& views, const at::Tensor& state, StepTrace* trace = nullptr) override;
  at::Tensor decode(const at::Tensor& state, const at::Tensor& queries) override;
  const WorldModelOptions& options() const override { return options_; }
  /// Locations (..., P) -> points of the modules' space (..., d_s).
  at::Tensor encode_locations(const at::Tensor& locations);
  at::Tensor embeddings;  // (M, d_s) the modules' places

 private:
  WorldModelOptions options_;
  torch::nn::Sequential location_encoder{nullptr}, view_encoder{nullptr}, decoder{nullptr};
  GroupLinear query{nullptr};
  ModuleCommunication communication{nullptr};
  torch::nn::Linear key{nullptr}, value{nullptr};
  ModuleGru cells{nullptr};
};
TORCH_MODULE(S2rm);

}  // namespace mdl
