#include "mdl/recurrent/world_model.h"

#include <ATen/ATen.h>

#include "mdl/core/error.h"
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
