// The `mdl` subcommands. Each registers its options on the CLI11 app and runs when selected; errors are
// exceptions, turned into one line and a non-zero exit by main.
#pragma once

#include <string>

namespace CLI {
class App;
}

namespace mdl::cli {

/// Options every command shares.
struct GlobalOptions {
  int threads = 0;                 ///< total thread budget; 0 = all cores (torch 1 x BLAS N, see threads.h)
  std::string log_level = "info";  ///< debug | info | warn | error | off
};

/// Adds init-model, inspect, tokenize, forward, generate, init-module and merge-into-base to `app`.
void register_commands(CLI::App& app, GlobalOptions& globals);

}  // namespace mdl::cli
