// Learning-rate schedules as pure functions of the step: constant, linear warm-up then linear decay, and
// linear warm-up then cosine decay (the schedules of Hugging Face's `get_*_schedule_with_warmup`).
#pragma once

#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <string>

namespace mdl {

template <class T>
class FieldList;

/// A learning-rate schedule.
struct ScheduleOptions {
  std::string kind = "linear";  ///< constant | linear | cosine
  double lr = 1e-3;             ///< peak learning rate
  int64_t warmup_steps = 0;     ///< linear ramp: step s < warmup_steps gets lr (s + 1) / warmup_steps
  int64_t total_steps = 0;      ///< decay ends here (linear, cosine); required for them
  double min_lr_ratio = 0.0;    ///< the decay's floor, as a fraction of lr
};
void to_json(nlohmann::json& j, const ScheduleOptions& o);
void from_json(const nlohmann::json& j, ScheduleOptions& o);
/// The fields of ScheduleOptions: JSON keys, defaults and meanings (core/fields.h).
const FieldList<ScheduleOptions>& schedule_fields();
/// Checks kind and ranges, naming the field.
void validate(const ScheduleOptions& o);

/// The learning rate for optimizer step `step` (0-based).
double learning_rate(const ScheduleOptions& o, int64_t step);

}  // namespace mdl
