#include "mdl/recurrent/world_model.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/core/fields.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/json_file.h"
#include "mdl/io/safetensors.h"
#include "mdl/recurrent/monolithic_gru.h"
#include "mdl/recurrent/rims.h"
#include "mdl/recurrent/s2rm.h"

namespace mdl {

std::shared_ptr<WorldModelImpl> make_world_model(const WorldModelOptions& o) {
  if (o.kind == "s2rm") return std::make_shared<S2rmImpl>(o);
  if (o.kind == "rims") return std::make_shared<RimsImpl>(o);
  if (o.kind == "gru") return std::make_shared<MonolithicGruImpl>(o);
  MDL_FAIL("[world_model] kind '", o.kind, "' is unknown; expected s2rm, rims or gru");
}

const FieldList<WorldModelOptions>& world_model_fields() {
  using O = WorldModelOptions;
  static const FieldList<O> f = FieldList<O>("world_model")
                                    .add("kind", &O::kind, "s2rm | rims | gru")
                                    .add("modules", &O::modules, "M, recurrent modules (gru: 1)")
                                    .add("feature_dim", &O::feature_dim, "F, a view's features")
                                    .add("location_dim", &O::location_dim, "P, a location's coordinates")
                                    .add("output_dim", &O::output_dim, "a prediction's width at a query")
                                    .add("hidden", &O::hidden, "H per module (gru: the cell's width)")
                                    .add("key_dim", &O::key_dim, "attention keys and queries")
                                    .add("value_dim", &O::value_dim, "what a module reads from a view")
                                    .add("space_dim", &O::space_dim, "s2rm: the modules' embedding space")
                                    .add("bandwidth", &O::bandwidth, "s2rm: the kernel's tau")
                                    .add("epsilon", &O::epsilon, "s2rm: the kernel is 0 below this")
                                    .add("top_k", &O::top_k, "rims: modules active per step")
                                    .add("seed", &O::seed, "initialisation seed");
  return f;
}

void save_world_model(const WorldModelImpl& model, const std::string& dir) {
  std::map<std::string, at::Tensor> tensors;
  for (const auto& p : model.named_parameters()) tensors[p.key()] = p.value().detach().cpu().contiguous();
  io::AtomicDirectory staged(dir);
  io::save_safetensors((std::filesystem::path(staged.path()) / "world_model.safetensors").string(), tensors);
  io::write_text_atomic((std::filesystem::path(staged.path()) / "world_model.json").string(),
                        world_model_fields().write(model.options()).dump(2) + "\n");
  staged.commit();
}

std::shared_ptr<WorldModelImpl> load_world_model(const std::string& dir) {
  const std::string config = (std::filesystem::path(dir) / "world_model.json").string();
  const std::string weights = (std::filesystem::path(dir) / "world_model.safetensors").string();
  WorldModelOptions o;
  try {
    o = world_model_fields().read(io::read_json(config));
  } catch (const Error& e) {
    MDL_FAIL("[world_model] '", config, "': ", e.what());
  }
  auto model = make_world_model(o);
  const auto tensors = io::load_safetensors(weights);
  torch::NoGradGuard g;
  auto params = model->named_parameters();
  for (auto& p : params) {
    const auto it = tensors.find(p.key());
    MDL_CHECK(it != tensors.end(), "[world_model] '", weights, "' has no tensor '", p.key(), "' (expected ",
              p.value().sizes(), ")");
    MDL_CHECK(it->second.sizes() == p.value().sizes(), "[world_model] '", weights, "': tensor '", p.key(),
              "' has shape ", it->second.sizes(), " but ", config, " makes it ", p.value().sizes());
    p.value().copy_(it->second);
  }
  for (const auto& [k, t] : tensors)
    MDL_CHECK(params.find(k) != nullptr, "[world_model] '", weights, "': tensor '", k.substr(0, 100),
              "' belongs to no parameter of a ", model->options().kind, " model");
  return model;
}

void check_views(const Views& v, const at::Tensor& state, const WorldModelOptions& o, int64_t modules,
                 const char* where) {
  MDL_CHECK(v.features.dim() == 3 && v.features.size(2) == o.feature_dim, "[", where,
            "] views.features must be (B, V, ", o.feature_dim, "), got ", v.features.sizes());
  const int64_t B = v.features.size(0), V = v.features.size(1);
  MDL_CHECK(V >= 1, "[", where, "] a step needs at least one view, got V = 0");
  MDL_CHECK(v.locations.dim() == 3 && v.locations.size(0) == B && v.locations.size(1) == V &&
                v.locations.size(2) == o.location_dim,
            "[", where, "] views.locations must be (", B, ", ", V, ", ", o.location_dim, "), got ",
            v.locations.sizes());
  MDL_CHECK(!v.mask.defined() || (v.mask.scalar_type() == at::kBool && v.mask.dim() == 2 &&
                                  v.mask.size(0) == B && v.mask.size(1) == V),
            "[", where, "] views.mask must be bool (", B, ", ", V, "), got ",
            v.mask.defined() ? v.mask.sizes() : at::IntArrayRef{});
  MDL_CHECK(state.dim() == 3 && state.size(0) == B && state.size(1) == modules && state.size(2) == o.hidden,
            "[", where, "] state must be (", B, ", ", modules, ", ", o.hidden, "), got ", state.sizes());
}

}  // namespace mdl
