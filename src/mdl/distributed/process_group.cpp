#include "mdl/distributed/process_group.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL  // CUDA builds of libtorch: NCCL for CUDA tensors
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "mdl/core/error.h"

namespace mdl {
namespace {

int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  MDL_CHECK(end && *end == '\0' && x >= 0, "[distributed] environment variable ", name, "='", v,
            "' must be a non-negative integer");
  return static_cast<int>(x);
}

}  // namespace

DistributedOptions DistributedOptions::from_env() {
  DistributedOptions o;
  o.world_size = env_int("WORLD_SIZE", 1);
  o.rank = env_int("RANK", 0);
  o.local_rank = env_int("LOCAL_RANK", o.rank);
  o.master_port = env_int("MASTER_PORT", o.master_port);
  if (const char* a = std::getenv("MASTER_ADDR"); a && *a) o.master_addr = a;
  if (const char* t = std::getenv("MDL_DIST_TIMEOUT"); t && *t) o.timeout_seconds = std::atof(t);
  MDL_CHECK(o.world_size >= 1 && o.rank < o.world_size, "[distributed] RANK ", o.rank,
            " must be below WORLD_SIZE ", o.world_size);
  MDL_CHECK(o.timeout_seconds > 0, "[distributed] MDL_DIST_TIMEOUT must be > 0 seconds");
  return o;
}

struct ProcessGroup::Impl {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  std::chrono::milliseconds timeout;

  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* what, int rank) {
    try {
      work->wait(timeout);
    } catch (const std::exception& e) {
      MDL_FAIL("[distributed] rank ", rank, ": ", what, " failed: a peer died, hung or was unreachable for ",
               timeout.count() / 1000.0, " s (", e.what(), ")");
    }
  }
};

ProcessGroup::ProcessGroup(const DistributedOptions& o) : options_(o), impl_(std::make_unique<Impl>()) {
  impl_->timeout = std::chrono::milliseconds(static_cast<int64_t>(o.timeout_seconds * 1000));
  c10d::TCPStoreOptions so;
  so.port = static_cast<std::uint16_t>(o.master_port);
  so.isServer = o.rank == 0;
  so.numWorkers = o.world_size;
  so.waitWorkers = true;
  so.timeout = impl_->timeout;
  try {
    impl_->store = c10::make_intrusive<c10d::TCPStore>(o.master_addr, so);
#ifdef USE_C10D_NCCL
    if (o.cuda) {
      auto nccl = c10d::ProcessGroupNCCL::Options::create();
      nccl->timeout = impl_->timeout;
      impl_->pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(impl_->store, o.rank, o.world_size, nccl);
      return;
    }
#endif
    auto options = c10d::ProcessGroupGloo::Options::create(impl_->timeout);
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(
        o.master_addr == "localhost" ? "127.0.0.1" : o.master_addr));
    options->threads = 1;
    impl_->pg = c10::make_intrusive<c10d::ProcessGroupGloo>(impl_->store, o.rank, o.world_size, options);
  } catch (const std::exception& e) {
    MDL_FAIL("[distributed] rank ", o.rank, " of ", o.world_size, " could not join the group at ",
             o.master_addr, ":", o.master_port, " within ", o.timeout_seconds, " s (", e.what(),
             "); check MASTER_ADDR/MASTER_PORT and that "
             "every rank started");
  }
}

ProcessGroup::~ProcessGroup() = default;

int64_t ProcessGroup::all_reduce_mean(const std::vector<at::Tensor>& tensors, int64_t bucket_bytes) {
  int64_t sent = 0;
  size_t start = 0;
  while (start < tensors.size()) {
    // A bucket: consecutive tensors of one dtype up to bucket_bytes, flattened into one buffer.
    size_t end = start;
    int64_t bytes = 0;
    while (end < tensors.size() && tensors[end].scalar_type() == tensors[start].scalar_type() &&
           tensors[end].device() == tensors[start].device() &&
           (end == start || bytes + tensors[end].numel() * tensors[end].element_size() <= bucket_bytes)) {
      bytes += tensors[end].numel() * tensors[end].element_size();
      ++end;
    }
    std::vector<at::Tensor> flat;
    for (size_t i = start; i < end; ++i) flat.push_back(tensors[i].reshape({-1}));
    std::vector<at::Tensor> buffer = {at::cat(flat)};
    impl_->wait(impl_->pg->allreduce(buffer), "all-reduce of gradients", options_.rank);
    buffer[0].div_(options_.world_size);
    int64_t offset = 0;
    for (size_t i = start; i < end; ++i) {
      const int64_t n = tensors[i].numel();
      tensors[i].view({-1}).copy_(buffer[0].narrow(0, offset, n));
      offset += n;
    }
    sent += bytes;
    start = end;
  }
  return sent;
}

void ProcessGroup::broadcast(const std::vector<at::Tensor>& tensors, int root) {
  for (const auto& t : tensors) {
    std::vector<at::Tensor> one = {t};
    c10d::BroadcastOptions bo;
    bo.rootRank = root;
    impl_->wait(impl_->pg->broadcast(one, bo), "broadcast", options_.rank);
  }
}

void ProcessGroup::barrier() {
  impl_->wait(impl_->pg->barrier(), "barrier", options_.rank);
}

}  // namespace mdl
