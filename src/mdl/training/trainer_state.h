// The trainer's private state (its parameters under stable keys, the optimiser, the data order), shared
// by the trainer's files (trainer.cpp: steps; trainer_checkpoint.cpp: checkpoints). Not for other users.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/optim/adamw.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "mdl/training/trainer.h"

namespace mdl {

struct Trainer::State {
  std::vector<std::string> keys;  // "<module>/<tensor>" of every trainable tensor, in parameter order
  std::vector<at::Tensor> params;
  std::unique_ptr<torch::optim::AdamW> optimizer;
  /// options.freeze_old_experts: parameters whose first rows (the old experts) are put back after each
  /// step, with the values they must keep (weight decay would move them even without a gradient).
  struct FrozenRows {
    at::Tensor param, rows;
  };
  std::vector<FrozenRows> frozen;
  int64_t epoch = -1;  // the epoch whose example order `order` holds
  std::vector<int64_t> order;

  std::vector<std::vector<int64_t>> by_task;  // example indices of each task (multi-task data)
  std::vector<double> task_cdf;               // cumulative sampling probabilities of the tasks

  /// Example index of global sample i, a function of (seed, i) so a resumed run reads the same data.
  /// Multi-task data: a task drawn from the sampling distribution, then an example of it (with
  /// replacement); otherwise the (i mod n)-th of epoch (i / n)'s permutation.
  int64_t sample(int64_t i, int64_t n, uint64_t seed) {
    if (by_task.empty()) return example(i, n, seed);
    std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(i));
    const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
    const size_t t = std::min<size_t>(
        std::upper_bound(task_cdf.begin(), task_cdf.end(), u) - task_cdf.begin(), by_task.size() - 1);
    const auto& pool = by_task[t];
    return pool[std::uniform_int_distribution<size_t>(0, pool.size() - 1)(rng)];
  }

  int64_t example(int64_t i, int64_t n, uint64_t seed) {
    if (i / n != epoch) {
      epoch = i / n;
      order.resize(static_cast<size_t>(n));
      std::iota(order.begin(), order.end(), 0);
      std::shuffle(order.begin(), order.end(), std::mt19937_64(seed + static_cast<uint64_t>(epoch)));
    }
    return order[static_cast<size_t>(i % n)];
  }
};

}  // namespace mdl
