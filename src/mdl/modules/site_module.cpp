#include "mdl/modules/site_module.h"

#include "mdl/core/error.h"

namespace mdl {

void SiteModule::merge() {
  MDL_FAIL("[merge] a ", type(), " module cannot be merged into the base weights; LoRA (incl. DoRA), (IA)^3, ",
           "sparse diffs, BitFit and LayerNorm tuning can");
}
void SiteModule::unmerge() { MDL_FAIL("[unmerge] a ", type(), " module is never merged"); }

at::Tensor AttachedModules::forward(const at::Tensor& input, const at::Tensor& base) {
  at::Tensor out = base;
  for (auto& e : entries_) {
    if (!e.active || e.merged || e.scale == 0.0) continue;
    at::Tensor next = e.module->forward(input, out);
    // A module that lengthens the sequence (a prompt) is on or off; scales apply to same-shape changes.
    out = e.scale == 1.0 || next.sizes() != out.sizes() ? next : out + e.scale * (next - out);
  }
  return out;
}

int64_t AttachedModules::prefix_positions() const {
  int64_t n = 0;
  for (const auto& e : entries_)
    if (e.active && !e.merged && e.scale != 0.0) n += e.module->prefix_positions();
  return n;
}

AttachedModules::Entry* AttachedModules::find(const std::string& name) {
  for (auto& e : entries_)
    if (e.name == name) return &e;
  return nullptr;
}

}  // namespace mdl
