#include "mdl/modules/site_module.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>

#include "mdl/core/error.h"
#include "mdl/core/forward_context.h"
#include "mdl/core/linear.h"
#include "mdl/modules/lora_bank.h"
#include "mdl/routing/routing_context.h"

namespace mdl {

void SiteModule::merge() {
  MDL_FAIL("[merge] a ", type(), " module cannot be merged into the base weights; LoRA (incl. DoRA), (IA)^3, ",
           "sparse diffs, BitFit and LayerNorm tuning can");
}
const std::vector<const SiteModule*>& SiteModule::absorbs() const {
  static const std::vector<const SiteModule*> none;
  return none;
}

void SiteModule::unmerge() { MDL_FAIL("[unmerge] a ", type(), " module is never merged"); }

at::Tensor SiteModule::forward_linear(const at::Tensor& input, const at::Tensor& weight,
                                      const at::Tensor& bias) {
  return forward(input, linear(input, weight, bias));
}

std::vector<AttachedModules::Entry*> AttachedModules::running() {
  std::vector<const SiteModule*> absorbed;  // members of active fusions: those run them
  for (const auto& e : entries_)
    if (e.active && e.scale != 0.0)
      for (const SiteModule* m : e.module->absorbs()) absorbed.push_back(m);
  std::vector<Entry*> run;
  for (auto& e : entries_)
    if (e.active && !e.merged && e.scale != 0.0 &&
        std::find(absorbed.begin(), absorbed.end(), e.module.get()) == absorbed.end())
      run.push_back(&e);
  return run;
}

at::Tensor AttachedModules::forward(const at::Tensor& input, const at::Tensor& base) {
  const ForwardContext& ctx = ForwardContext::current();
  if (ctx.routing && !ctx.routing->modules.empty())
    return forward_per_example(input, base, ctx.routing->modules);
  return forward_running(running(), input, base);
}

at::Tensor AttachedModules::forward_running(const std::vector<Entry*>& run, const at::Tensor& input,
                                            const at::Tensor& base) {
  at::Tensor out = base;
  for (Entry* e : run) {
    at::Tensor next = e->module->forward(input, out);
    // A module that lengthens the sequence (a prompt) is on or off; scales apply to same-shape changes.
    out = e->scale == 1.0 || next.sizes() != out.sizes() ? next : out + e->scale * (next - out);
  }
  return out;
}

at::Tensor AttachedModules::forward_linear(const at::Tensor& input, const at::Tensor& weight,
                                           const at::Tensor& bias) {
  const ForwardContext& ctx = ForwardContext::current();
  if (ctx.routing && !ctx.routing->modules.empty())
    return forward_per_example(input, linear(input, weight, bias), ctx.routing->modules);
  const std::vector<Entry*> run = running();  // once per call: the fold decision and the loop share it
  if (run.size() == 1 && run[0]->scale == 1.0) return run[0]->module->forward_linear(input, weight, bias);
  return forward_running(run, input, linear(input, weight, bias));
}

at::Tensor AttachedModules::forward_per_example(const at::Tensor& input, const at::Tensor& base,
                                                const std::vector<std::vector<ModuleChoice>>& choices) {
  const int64_t B = base.size(0);
  MDL_CHECK(static_cast<int64_t>(choices.size()) == B, "[routing] the routing context names modules for ",
            choices.size(), " examples but the batch has ", B);
  if (at::Tensor gathered = forward_gathered(input, base, choices); gathered.defined()) return gathered;
  at::Tensor out = base;
  for (auto& e : entries_) {
    std::vector<int64_t> rows;
    std::vector<double> scales;
    for (int64_t b = 0; b < B; ++b)
      for (const auto& c : choices[static_cast<size_t>(b)])
        if (c.name == e.name && c.scale != 0.0) rows.push_back(b), scales.push_back(c.scale);
    MDL_CHECK(!e.merged, "[routing] module '", e.name, "' is merged into the base weights, so every example uses it; ",
              "unmerge it to choose modules per example");
    if (rows.empty()) continue;
    MDL_CHECK(e.module->prefix_positions() == 0, "[routing] module '", e.name, "' is a prefix: it lengthens every ",
              "example's keys and values, so it cannot be chosen per example; give such requests a batch of their own");
    // Every example: no gather; else the chosen rows only, scattered back.
    const bool all = static_cast<int64_t>(rows.size()) == B;
    at::Tensor idx = all ? at::Tensor() : at::tensor(rows, at::TensorOptions().dtype(at::kLong)).to(base.device());
    at::Tensor sub_in = all ? input : input.index_select(0, idx);
    at::Tensor sub = all ? out : out.index_select(0, idx);
    at::Tensor next = e.module->forward(sub_in, sub);
    MDL_CHECK(next.sizes() == sub.sizes(), "[routing] module '", e.name, "' changes the sequence length (a prompt); ",
              "per-example routing needs modules that keep shapes");
    std::vector<int64_t> view(static_cast<size_t>(base.dim()), 1);
    view[0] = static_cast<int64_t>(rows.size());
    at::Tensor s = at::tensor(scales, at::TensorOptions().dtype(at::kDouble)).to(base.device(), base.scalar_type());
    at::Tensor change = s.view(view) * (next - sub);
    out = all ? out + change : out.index_add(0, idx, change);
  }
  return out;
}

at::Tensor AttachedModules::forward_gathered(const at::Tensor& input, const at::Tensor& base,
                                             const std::vector<std::vector<ModuleChoice>>& choices) {
  // The bank holds every plain LoRA attached here, in attachment order, so it stays the same while
  // requests join and leave a batch (restacked only when modules are loaded, unloaded or changed).
  std::vector<LoraBank::Factors> factors;
  std::vector<int64_t> bank_index(entries_.size(), -1);  // entry -> bank position (-1: not a plain LoRA)
  for (size_t i = 0; i < entries_.size(); ++i) {
    LoraBank::Factors f;
    if (entries_[i].merged || !entries_[i].module->low_rank(f.A, f.B, f.scaling)) continue;
    bank_index[i] = static_cast<int64_t>(factors.size());
    factors.push_back(f);
  }
  // Each row's bank positions and scales; any chosen module the bank cannot run sends the batch to the
  // general path (which also reports merged modules), as does a needed gradient (the bank is a copy).
  const int64_t B = base.size(0);
  std::vector<std::vector<std::pair<int64_t, double>>> rows(static_cast<size_t>(B));
  std::vector<bool> used(factors.size(), false);
  size_t slots = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (const auto& c : choices[static_cast<size_t>(b)]) {
      size_t i = 0;
      while (i < entries_.size() && entries_[i].name != c.name) ++i;
      if (i == entries_.size() || c.scale == 0.0) continue;  // not at this site
      const int64_t k = bank_index[i];
      if (k < 0) return {};
      const auto& f = factors[static_cast<size_t>(k)];
      if (at::GradMode::is_enabled() && (f.A.requires_grad() || f.B.requires_grad())) return {};
      rows[static_cast<size_t>(b)].emplace_back(k, c.scale);
      used[static_cast<size_t>(k)] = true;
    }
    slots = std::max(slots, rows[static_cast<size_t>(b)].size());
  }
  if (std::count(used.begin(), used.end(), true) < 2) return {};  // one LoRA (or none): the row-subset path costs no more
  if (!bank_) bank_ = std::make_shared<LoraBank>();
  bank_->update(factors, ForwardContext::current().routing->lora_bank_dtype);
  at::Tensor out = base;
  for (size_t s = 0; s < slots; ++s) {  // the s-th LoRA of every row (most rows choose one)
    std::vector<int64_t> idx(static_cast<size_t>(B), bank_->none());
    std::vector<double> scale(static_cast<size_t>(B), 0.0);
    for (int64_t b = 0; b < B; ++b)
      if (s < rows[static_cast<size_t>(b)].size())
        std::tie(idx[static_cast<size_t>(b)], scale[static_cast<size_t>(b)]) = rows[static_cast<size_t>(b)][s];
    out = bank_->apply(input, out, at::tensor(idx, at::kLong).to(base.device()),
                       at::tensor(scale, at::kDouble).to(base.device()));
  }
  return out;
}

void AttachedModules::set_training(bool on) {
  for (auto& e : entries_) e.module->train(on);
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
