// Tiny checkpoints made once per test binary with init-model (the same code as `mdl init-model`).
#pragma once

#include <map>
#include <string>

#include "mdl/backbones/init_model.h"
#include "test_util.h"

namespace mdl::test {

/// Directory of a tiny checkpoint for `arch` ("gpt2", "llama", "mistral", "qwen2", "bert") and `head`.
inline std::string tiny_checkpoint(const std::string& arch, const std::string& head = "") {
  static TempDir root;
  static std::map<std::string, std::string> made;
  const std::string key = arch + ":" + head;
  auto it = made.find(key);
  if (it != made.end()) return it->second;
  InitModelOptions o;
  o.arch = arch;
  o.head = head;
  o.seed = 11;
  const std::string dir = root / (arch + "-" + (head.empty() ? "default" : head));
  init_model(o, dir);
  made[key] = dir;
  return dir;
}

}  // namespace mdl::test
