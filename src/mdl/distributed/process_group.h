// Processes that train together, on PyTorch's own distributed engine: c10d's ProcessGroupGloo over a
// TCPStore rendezvous (rank 0 hosts the store). The settings follow torchrun's conventions: MASTER_ADDR,
// MASTER_PORT, WORLD_SIZE, RANK, LOCAL_RANK. Collectives fail with a clear error within the timeout when
// a peer dies or hangs, never a silent hang. c10d's headers stay in the .cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace mdl {

struct DistributedOptions {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  /// a collective that does not complete in this time fails (a dead or hung peer)
  double timeout_seconds = 60;
  bool cuda = false;  ///< tensors live on CUDA: NCCL where libtorch was built with it, Gloo otherwise

  /// From torchrun's environment variables; a malformed one is an error naming it. MDL_DIST_TIMEOUT
  /// (seconds) sets the timeout.
  static DistributedOptions from_env();
  bool distributed() const { return world_size > 1; }
};

class ProcessGroup {
 public:
  /// Joins the group (blocks until every rank has joined or the timeout passes).
  explicit ProcessGroup(const DistributedOptions& options);
  ~ProcessGroup();
  int rank() const { return options_.rank; }
  int size() const { return options_.world_size; }

  /// Averages `tensors` over the ranks in place, flattened into buckets of at most `bucket_bytes`
  /// (one all-reduce per bucket); returns the bytes this rank contributed.
  int64_t all_reduce_mean(const std::vector<at::Tensor>& tensors, int64_t bucket_bytes = 25 << 20);
  /// Copies rank `root`'s tensors to every rank.
  void broadcast(const std::vector<at::Tensor>& tensors, int root = 0);
  void barrier();

 private:
  struct Impl;
  DistributedOptions options_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mdl
