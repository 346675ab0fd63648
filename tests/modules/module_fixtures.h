// Modules made for tests: bottleneck adapters with random (non-zero) weights, so that they change what
// they touch and two of them do not commute.
#pragma once

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <string>
#include <vector>

#include "mdl/backbones/model.h"
#include "mdl/modules/module_set.h"

namespace mdl::test {

/// Saves one adapter per name under `dir`/<name>, for the checkpoint `model`; weights N(0, std^2), seeded
/// by `seed` and the name's position.
inline void save_random_adapters(const std::string& model, const std::string& dir,
                                 const std::vector<std::string>& names, uint64_t seed, double std = 0.3) {
  ModuleSet set(load_model(model));
  ModuleConfig adapter;
  adapter.type = "adapter";
  for (size_t i = 0; i < names.size(); ++i) {
    set.add(names[i], adapter);
    torch::NoGradGuard g;
    at::manual_seed(static_cast<uint64_t>(seed + i));
    for (auto& [k, t] : set.tensors(names[i])) t.copy_(at::randn_like(t) * std);
    set.save(names[i], dir + "/" + names[i]);
  }
}

}  // namespace mdl::test
