// Branch-Train-Merge (Li et al., 2022): rank r trains branches r, r + W, ... of a run config (a fresh
// copy of the module template each, on the branch's data, no gradient exchange), then rank 0 merges
// every branch's module into <out_dir>/modules/merged.
#pragma once

namespace mdl {

struct TrainConfig;
class ProcessGroup;

/// Trains this rank's branches of `config` (`group` may be null: one process trains them all), waits for
/// every rank, and on rank 0 merges them with config.branch_merge.
void train_branches(const TrainConfig& config, ProcessGroup* group);

}  // namespace mdl
