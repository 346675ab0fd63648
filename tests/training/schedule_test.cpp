// Learning-rate schedules at hand-picked steps, and their validation.
#include "mdl/training/schedule.h"

#include <cmath>

#include "test_util.h"

namespace mdl {
namespace {

ScheduleOptions schedule(const std::string& kind, int64_t warmup, int64_t total, double floor = 0.0) {
  ScheduleOptions o;
  o.kind = kind;
  o.lr = 1.0;
  o.warmup_steps = warmup;
  o.total_steps = total;
  o.min_lr_ratio = floor;
  validate(o);
  return o;
}

TEST(Schedule, WarmupThenDecay) {
  auto lin = schedule("linear", 4, 14);
  EXPECT_DOUBLE_EQ(learning_rate(lin, 0), 0.25);
  EXPECT_DOUBLE_EQ(learning_rate(lin, 3), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(lin, 4), 1.0);
  EXPECT_DOUBLE_EQ(learning_rate(lin, 9), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate(lin, 14), 0.0);
  EXPECT_DOUBLE_EQ(learning_rate(lin, 100), 0.0);
  auto cos = schedule("cosine", 0, 10, 0.1);
  EXPECT_DOUBLE_EQ(learning_rate(cos, 0), 1.0);
  EXPECT_NEAR(learning_rate(cos, 5), 0.1 + 0.9 * 0.5, 1e-12);
  EXPECT_NEAR(learning_rate(cos, 10), 0.1, 1e-12);
  auto constant = schedule("constant", 2, 0);
  EXPECT_DOUBLE_EQ(learning_rate(constant, 0), 0.5);
  EXPECT_DOUBLE_EQ(learning_rate(constant, 1000), 1.0);
}

TEST(Schedule, InvalidOptionsAreRefused) {
  EXPECT_THROW_WITH(schedule("step", 0, 10), "[schedule] kind 'step' is unknown");
  EXPECT_THROW_WITH(schedule("linear", 10, 10),
                    "needs total_steps > warmup_steps, got total_steps 10 and warmup_steps 10");
  EXPECT_THROW_WITH(schedule("cosine", 0, 10, 2.0), "min_lr_ratio must be in [0, 1], got 2");
}

}  // namespace
}  // namespace mdl
