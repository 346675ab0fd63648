#include "mdl/recurrent/bouncing_balls.h"

#include <ATen/ATen.h>

#include <cmath>

#include "mdl/core/error.h"

namespace mdl {

BouncingBalls::BouncingBalls(const BouncingBallsOptions& o) : options_(o), rng_(o.seed) {
  MDL_CHECK(o.cells >= 4 && o.crop >= 1 && o.crop % 2 == 1 && o.crop <= o.cells && o.width > 0 &&
                o.min_speed >= 0 && o.max_speed >= o.min_speed,
            "[balls] needs cells >= 4, an odd crop <= cells, width > 0 and 0 <= min_speed <= max_speed; got ",
            o.cells, " cells, crop ", o.crop, ", width ", o.width, ", speeds ", o.min_speed, "..",
            o.max_speed);
}

at::Tensor BouncingBalls::locations(const at::Tensor& x) const {
  const at::Tensor angle = x * (2 * M_PI / static_cast<double>(options_.cells));
  return at::stack({at::cos(angle), at::sin(angle)}, -1);
}

BallsEpisodes BouncingBalls::sample(int64_t B, int64_t T, int64_t V, int64_t balls) {
  const int64_t C = options_.cells;
  MDL_CHECK(B > 0 && T > 0 && V > 0 && balls > 0 && balls <= C / 4,
            "[balls] needs positive batch, steps, views ", "and 1 to ", C / 4, " balls; got ", B, ", ", T,
            ", ", V, ", ", balls);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<float> frames(static_cast<size_t>(B * (T + 1) * C));
  for (int64_t b = 0; b < B; ++b) {
    // Evenly spread starting places, jittered, so no two balls start on top of each other.
    std::vector<double> x(static_cast<size_t>(balls)), v(static_cast<size_t>(balls));
    const double offset = unit(rng_) * C, gap = static_cast<double>(C) / static_cast<double>(balls);
    for (int64_t i = 0; i < balls; ++i) {
      x[i] = std::fmod(offset + gap * (i + 0.5 * unit(rng_) - 0.25), C);
      const double speed = options_.min_speed + (options_.max_speed - options_.min_speed) * unit(rng_);
      v[i] = unit(rng_) < 0.5 ? -speed : speed;
    }
    for (int64_t t = 0; t <= T; ++t) {
      float* f = &frames[static_cast<size_t>((b * (T + 1) + t) * C)];
      for (int64_t c = 0; c < C; ++c) {
        double value = 0;
        for (int64_t i = 0; i < balls; ++i) {
          double d = std::fabs(static_cast<double>(c) - x[i]);
          d = std::min(d, C - d);  // distance on the ring
          value += std::exp(-0.5 * d * d / (options_.width * options_.width));
        }
        f[c] = static_cast<float>(std::min(value, 1.0));
      }
      // Move, then let balls that came within 2 widths of each other, approaching, swap velocities.
      for (int64_t i = 0; i < balls; ++i) x[i] = std::fmod(x[i] + v[i] + C, C);
      for (int64_t i = 0; i < balls; ++i)
        for (int64_t j = i + 1; j < balls; ++j) {
          double d = x[j] - x[i];
          d -= C * std::round(d / C);  // signed ring distance from i to j
          if (std::fabs(d) < 2 * options_.width && (v[i] - v[j]) * d > 0) std::swap(v[i], v[j]);
        }
    }
  }
  BallsEpisodes out;
  out.frames = at::from_blob(frames.data(), {B, T + 1, C}, at::kFloat).clone();
  const int64_t half = options_.crop / 2;
  std::uniform_int_distribution<int64_t> centre(0, C - 1);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int64_t> idx(static_cast<size_t>(B * V * options_.crop));
    std::vector<float> centres(static_cast<size_t>(B * V));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < V; ++k) {
        const int64_t c0 = centre(rng_);
        centres[static_cast<size_t>(b * V + k)] = static_cast<float>(c0);
        for (int64_t j = 0; j < options_.crop; ++j)
          idx[static_cast<size_t>((b * V + k) * options_.crop + j)] = ((c0 + j - half) % C + C) % C;
      }
    const at::Tensor cells = at::from_blob(idx.data(), {B, V * options_.crop}, at::kLong).clone();
    const at::Tensor frame = out.frames.select(1, t);  // (B, C)
    Views views;
    views.features = frame.gather(1, cells).view({B, V, options_.crop});
    views.locations = locations(at::from_blob(centres.data(), {B, V}, at::kFloat).clone());
    out.views.push_back(views);
  }
  out.queries = locations(at::arange(C, at::kFloat)).unsqueeze(0).expand({B, C, 2}).contiguous();
  return out;
}

}  // namespace mdl
