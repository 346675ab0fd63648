// `mdl train --nproc N`: the running command again as N local worker processes with torchrun's
// variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT on a free loopback port), the thread
// budget split between them.
#pragma once

namespace mdl {

/// Starts `n` workers running this process's command line with `--nproc` dropped and `--threads` set to
/// each one's share of `threads` (0: the machine's cores); waits for all of them. Returns how many failed
/// (each one's exit status or signal is printed to stderr).
int launch_local_workers(int n, int threads);

}  // namespace mdl
