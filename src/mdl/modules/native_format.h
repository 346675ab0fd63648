// mdl's own module directories: `module.json` (format "mdl-module", version 1: name, type, the module
// config, the sites it covers, its parameter count and the fingerprint of the base it was made for) and
// `module.safetensors` ("<site>.<parameter>" -> tensor). Written as a whole or not at all (a staged
// directory renamed into place); read with errors that name the file and the field.
#pragma once

#include <string>

#include "mdl/modules/module_set.h"

namespace mdl {

/// Reads the native module directory `dir`.
ModuleFiles read_native(const std::string& dir);

/// Writes module `name` of `set` as a native directory at `dir`.
void write_native(const ModuleSet& set, const std::string& name, const std::string& dir);

}  // namespace mdl
