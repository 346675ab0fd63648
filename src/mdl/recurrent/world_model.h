// Recurrent world models that see the world through a variable number of local views: S2RMs (recurrent
// modules placed in a learned space, s2rm.h) and its baselines, RIMs (rims.h) and one monolithic GRU
// (monolithic_gru.h), behind one interface, so that data, training and the study treat them alike.
//
//   step:   views (B, V, F) at locations (B, V, P) + state (B, M, H) -> the next state (B, M, H)
//   decode: state + query locations (B, Q, P) -> predictions (B, Q, out) at those locations
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

#include <cstdint>
#include <memory>
#include <string>

#include "mdl/core/fields.h"

namespace mdl {

/// A set of local views: V feature vectors with their locations; `mask` (B, V) marks the real ones when
/// the examples of a batch have different V (undefined: every view is real).
struct Views {
  at::Tensor features;   ///< (B, V, F)
  at::Tensor locations;  ///< (B, V, P)
  at::Tensor mask;       ///< (B, V) bool, or undefined
};

/// What a step routed, for logging and the routing metrics (which modules take which views).
struct StepTrace {
  at::Tensor input_kernel;     ///< (B, M, V) kernel between modules and views (S2RMs; RIMs: undefined)
  at::Tensor input_attention;  ///< (B, M, V) each module's attention over the views (0 where it got none)
  at::Tensor active;           ///< (B, M) bool: the modules updated this step
  at::Tensor module_kernel;    ///< (M, M) the communication kernel (S2RMs; undefined otherwise)
};

/// Sizes and kind of a world model; fields a kind does not use are ignored by it.
struct WorldModelOptions {
  std::string kind = "s2rm";  ///< s2rm | rims | gru
  int64_t modules = 8;        ///< M (gru: 1)
  int64_t feature_dim = 4;    ///< F, a view's features
  int64_t location_dim = 2;   ///< P, a location's coordinates
  int64_t output_dim = 1;     ///< a prediction's width at a query location
  int64_t hidden = 32;        ///< H per module (gru: the cell's width)
  int64_t key_dim = 16;       ///< attention keys and queries
  int64_t value_dim = 16;     ///< what a module reads from a view or another module
  int64_t space_dim = 2;      ///< s2rm: d_s, the modules' embedding space
  double bandwidth = 0.5;     ///< s2rm: the kernel's tau
  double epsilon = 0.05;      ///< s2rm: the kernel is 0 below this
  int64_t top_k = 4;          ///< rims: modules active per step
  uint64_t seed = 0;
};

/// The options' JSON fields (world_model.json), declared once.
const FieldList<WorldModelOptions>& world_model_fields();

/// The interface every world model implements.
class WorldModelImpl : public torch::nn::Module {
 public:
  /// The state before any view: (B, M, H) zeros.
  virtual at::Tensor initial_state(int64_t batch) const = 0;
  /// One step: the next state; `trace` (if given) receives what was routed.
  virtual at::Tensor step(const Views& views, const at::Tensor& state, StepTrace* trace = nullptr) = 0;
  /// Predictions (B, Q, out) at query locations (B, Q, P).
  virtual at::Tensor decode(const at::Tensor& state, const at::Tensor& queries) = 0;
  virtual const WorldModelOptions& options() const = 0;
};

/// A world model of `options.kind`; throws naming the kind when it is unknown.
std::shared_ptr<WorldModelImpl> make_world_model(const WorldModelOptions& options);

/// Writes `model` to directory `dir` atomically (both files or neither): `world_model.json` (its options)
/// and `world_model.safetensors` (its parameters by name).
void save_world_model(const WorldModelImpl& model, const std::string& dir);
/// Reads what save_world_model wrote; throws naming the file and the field or tensor that is missing,
/// unknown or of another shape.
std::shared_ptr<WorldModelImpl> load_world_model(const std::string& dir);

/// Checks a views/state pair against a model's sizes; throws naming the tensor, its shape and the expected.
void check_views(const Views& views, const at::Tensor& state, const WorldModelOptions& options,
                 int64_t modules, const char* where);

}  // namespace mdl
