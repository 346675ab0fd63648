#include "mdl/training/schedule.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/core/fields.h"

namespace mdl {

const FieldList<ScheduleOptions>& schedule_fields() {
  static const FieldList<ScheduleOptions> f =
      FieldList<ScheduleOptions>("options.schedule")
          .add("kind", &ScheduleOptions::kind, "constant | linear | cosine learning-rate schedule")
          .add("lr", &ScheduleOptions::lr, "peak learning rate")
          .add("warmup_steps", &ScheduleOptions::warmup_steps, "linear warm-up steps")
          .add("total_steps", &ScheduleOptions::total_steps,
               "where the decay ends (a run config's default: options.steps)")
          .add("min_lr_ratio", &ScheduleOptions::min_lr_ratio, "the decay's floor as a fraction of lr")
          .check([](const ScheduleOptions& o) { validate(o); });
  return f;
}

void to_json(nlohmann::json& j, const ScheduleOptions& o) {
  j = schedule_fields().write(o);
}

void from_json(const nlohmann::json& j, ScheduleOptions& o) {
  o = schedule_fields().read(j);
}

void validate(const ScheduleOptions& o) {
  MDL_CHECK(o.kind == "constant" || o.kind == "linear" || o.kind == "cosine", "[schedule] kind '", o.kind,
            "' is unknown; expected constant, linear or cosine");
  MDL_CHECK(o.lr > 0, "[schedule] lr must be > 0, got ", o.lr);
  MDL_CHECK(o.warmup_steps >= 0, "[schedule] warmup_steps must be >= 0, got ", o.warmup_steps);
  MDL_CHECK(o.kind == "constant" || o.total_steps > o.warmup_steps, "[schedule] a ", o.kind,
            " schedule needs ", "total_steps > warmup_steps, got total_steps ", o.total_steps,
            " and warmup_steps ", o.warmup_steps);
  MDL_CHECK(o.min_lr_ratio >= 0 && o.min_lr_ratio <= 1, "[schedule] min_lr_ratio must be in [0, 1], got ",
            o.min_lr_ratio);
}

double learning_rate(const ScheduleOptions& o, int64_t step) {
  if (step < o.warmup_steps)
    return o.lr * static_cast<double>(step + 1) / static_cast<double>(o.warmup_steps);
  if (o.kind == "constant") return o.lr;
  const double progress = std::min(
      1.0, static_cast<double>(step - o.warmup_steps) / static_cast<double>(o.total_steps - o.warmup_steps));
  const double decay = o.kind == "linear" ? 1.0 - progress : 0.5 * (1.0 + std::cos(M_PI * progress));
  return o.lr * (o.min_lr_ratio + (1.0 - o.min_lr_ratio) * decay);
}

}  // namespace mdl
