// mdl: modular deep learning on libtorch. Exceptions end here as one line on stderr and exit code 1.
#include <c10/util/Exception.h>

#include <CLI/CLI.hpp>
#include <iostream>

#include "mdl/cli/commands.h"
#include "mdl/core/error.h"

int main(int argc, char** argv) {
  CLI::App app{"mdl: modular deep learning (modules, routing, aggregation) on Transformer backbones", "mdl"};
  app.require_subcommand(1);
  app.failure_message([](const CLI::App* failed, const CLI::Error& e) {
    return "mdl: error: " + std::string(e.what()) + " (see mdl " +
           (failed->get_parent() ? failed->get_name() + " " : "") + "--help)\n";
  });
  app.set_version_flag("--version", "mdl 0.1.0");
  mdl::cli::GlobalOptions globals;
  app.add_option("--threads", globals.threads,
                 "total CPU threads (default: all cores; torch runs 1 intra-op thread, OpenBLAS the rest)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--log-level", globals.log_level, "debug|info|warn|error|off")
      ->check(CLI::IsMember({"debug", "info", "warn", "error", "off"}));
  mdl::cli::register_commands(app, globals);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const mdl::Error& e) {
    std::cerr << "mdl: error: " << e.what() << "\n";
    return 1;
  } catch (const c10::Error& e) {
    std::cerr << "mdl: error: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "mdl: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
