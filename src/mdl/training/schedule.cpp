#include "mdl/training/schedule.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"

namespace mdl {

void to_json(nlohmann::json& j, const ScheduleOptions& o) {
  j = {{"kind", o.kind}, {"lr", o.lr}, {"warmup_steps", o.warmup_steps}, {"total_steps", o.total_steps},
       {"min_lr_ratio", o.min_lr_ratio}};
}

void from_json(const nlohmann::json& j, ScheduleOptions& o) {
  o = ScheduleOptions();
  o.kind = j.value("kind", o.kind);
  o.lr = j.value("lr", o.lr);
  o.warmup_steps = j.value("warmup_steps", o.warmup_steps);
  o.total_steps = j.value("total_steps", o.total_steps);
  o.min_lr_ratio = j.value("min_lr_ratio", o.min_lr_ratio);
  validate(o);
}

void validate(const ScheduleOptions& o) {
  MDL_CHECK(o.kind == "constant" || o.kind == "linear" || o.kind == "cosine", "[schedule] kind '", o.kind,
            "' is unknown; expected constant, linear or cosine");
  MDL_CHECK(o.lr > 0, "[schedule] lr must be > 0, got ", o.lr);
  MDL_CHECK(o.warmup_steps >= 0, "[schedule] warmup_steps must be >= 0, got ", o.warmup_steps);
  MDL_CHECK(o.kind == "constant" || o.total_steps > o.warmup_steps, "[schedule] a ", o.kind, " schedule needs ",
            "total_steps > warmup_steps, got total_steps ", o.total_steps, " and warmup_steps ", o.warmup_steps);
  MDL_CHECK(o.min_lr_ratio >= 0 && o.min_lr_ratio <= 1, "[schedule] min_lr_ratio must be in [0, 1], got ", o.min_lr_ratio);
}

double learning_rate(const ScheduleOptions& o, int64_t step) {
  if (step < o.warmup_steps) return o.lr * static_cast<double>(step + 1) / static_cast<double>(o.warmup_steps);
  if (o.kind == "constant") return o.lr;
  const double progress = std::min(1.0, static_cast<double>(step - o.warmup_steps) /
                                            static_cast<double>(o.total_steps - o.warmup_steps));
  const double decay = o.kind == "linear" ? 1.0 - progress : 0.5 * (1.0 + std::cos(M_PI * progress));
  return o.lr * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * decay);
}

}  // namespace mdl
