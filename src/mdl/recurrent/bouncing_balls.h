// The world of S2RMs' video-prediction study, at a prototype's size: balls moving on a 1-D ring of cells,
// each bouncing elastically off the others (equal masses: two balls that meet swap velocities), rendered as
// Gaussian bumps. A model sees it through V random crops per step (views: `crop` cells around a random
// centre, located by the centre's angle (cos, sin)) and predicts the next whole frame, queried at every
// cell's location.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <random>
#include <vector>

#include "mdl/recurrent/world_model.h"

namespace mdl {

struct BouncingBallsOptions {
  int64_t cells = 32;      ///< C, the ring's length
  int64_t crop = 5;        ///< cells per view (odd)
  double width = 1.0;      ///< a ball's Gaussian width in cells
  double min_speed = 0.5;  ///< cells per step, drawn uniformly in [min, max] with a random sign
  double max_speed = 1.5;
  uint64_t seed = 0;
};

/// A batch of episodes: frames and, per step, the views of that step's frame.
struct BallsEpisodes {
  at::Tensor frames;         ///< (B, T + 1, C) in [0, 1]
  std::vector<Views> views;  ///< T steps: views of frame t (features (B, V, crop), locations (B, V, 2))
  at::Tensor queries;        ///< (B, C, 2) every cell's location
};

class BouncingBalls {
 public:
  explicit BouncingBalls(const BouncingBallsOptions& options);
  /// B episodes of T steps with `balls` balls each and V views per step (reproducible: the generator's
  /// state advances with each call).
  BallsEpisodes sample(int64_t batch, int64_t steps, int64_t views, int64_t balls);
  /// The location (cos, sin) of ring position x (in cells).
  at::Tensor locations(const at::Tensor& x) const;
  const BouncingBallsOptions& options() const { return options_; }

 private:
  BouncingBallsOptions options_;
  std::mt19937_64 rng_;
};

}  // namespace mdl
