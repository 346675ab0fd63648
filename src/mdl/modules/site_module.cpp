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
  MDL_FAIL("[merge] a ", type(),
           " module cannot be merged into the base weights; LoRA (incl. DoRA), (IA)^3, ",
           "sparse diffs, BitFit and LayerNorm tuning can");
}
const std::vector<const SiteModule*>& SiteModule::absorbs() const {
  static const std::vector<const SiteModule*> none;
  return none;
}

void SiteModule::unmerge() {
  MDL_FAIL("[unmerge] a ", type(), " module is never merged");
}

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
  const ModuleRouting routing = route(base.size(0));  // route
  if (at::Tensor gathered = forward_gathered(input, base, routing); gathered.defined()) return gathered;
  return compute(input, base, routing);  // compute, aggregate
}

ModuleRouting AttachedModules::route(int64_t rows) {
  const ForwardContext& ctx = ForwardContext::current();
  if (!ctx.routing || ctx.routing->modules.empty()) {  // every row: the active modules in attachment order
    std::vector<ModuleRouting::Choice> choices;
    for (Entry* e : running()) choices.emplace_back(e - entries_.data(), e->scale);
    return ModuleRouting::same_for_all(rows, std::move(choices));
  }
  const auto& chosen = ctx.routing->modules;
  MDL_CHECK(static_cast<int64_t>(chosen.size()) == rows, "[routing] the routing context names modules for ",
            chosen.size(), " examples but the batch has ", rows);
  std::vector<std::vector<ModuleRouting::Choice>> per_row(static_cast<size_t>(rows));
  for (int64_t b = 0; b < rows; ++b)
    for (const auto& c : chosen[static_cast<size_t>(b)]) {
      Entry* e = find(c.name);
      if (!e || c.scale == 0.0) continue;  // a module not at this site is absent here
      MDL_CHECK(!e->merged, "[routing] module '", e->name,
                "' is merged into the base weights, so every example uses ",
                "it; unmerge it to choose modules per example");
      MDL_CHECK(e->module->prefix_positions() == 0, "[routing] module '", e->name,
                "' is a prefix: it lengthens every ",
                "example's keys and values, so it cannot be chosen per example; give such requests a batch "
                "of their own");
      per_row[static_cast<size_t>(b)].emplace_back(e - entries_.data(), c.scale);
    }
  return ModuleRouting::per_example(std::move(per_row));
}

at::Tensor AttachedModules::compute(const at::Tensor& input, const at::Tensor& base,
                                    const ModuleRouting& routing) {
  return dispatch_in_order(input, base, routing,
                           [&](int64_t i, const at::Tensor& x, const at::Tensor& current) {
                             return entries_[static_cast<size_t>(i)].module->forward(x, current);
                           });
}

at::Tensor AttachedModules::forward_linear(const at::Tensor& input, const at::Tensor& weight,
                                           const at::Tensor& bias) {
  const ForwardContext& ctx = ForwardContext::current();
  if (!ctx.routing || ctx.routing->modules.empty()) {
    const std::vector<Entry*> run = running();  // one LoRA alone at scale 1: folded into the projection
    if (run.size() == 1 && run[0]->scale == 1.0) return run[0]->module->forward_linear(input, weight, bias);
  }
  return forward(input, linear(input, weight, bias));
}

at::Tensor AttachedModules::forward_gathered(const at::Tensor& input, const at::Tensor& base,
                                             const ModuleRouting& routing) {
  if (routing.is_shared() || routing.empty()) return {};  // the bank serves rows that differ
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
  // Any chosen module the bank cannot run sends the batch to the general path, as does a needed gradient
  // (the bank is a copy).
  std::vector<bool> used(factors.size(), false);
  for (int64_t b = 0; b < routing.rows; ++b)
    for (const auto& [i, scale] : routing.of(b)) {
      const int64_t k = bank_index[static_cast<size_t>(i)];
      if (k < 0) return {};
      const auto& f = factors[static_cast<size_t>(k)];
      if (at::GradMode::is_enabled() && (f.A.requires_grad() || f.B.requires_grad())) return {};
      used[static_cast<size_t>(k)] = true;
    }
  if (std::count(used.begin(), used.end(), true) < 2)
    return {};  // one LoRA: the row-subset path costs no more
  if (!bank_) bank_ = std::make_shared<LoraBank>();
  bank_->update(factors, bank_storage_);
  const int64_t B = routing.rows;
  at::Tensor out = base;
  for (size_t s = 0; s < routing.steps(); ++s) {  // the s-th LoRA of every row (most rows choose one)
    std::vector<int64_t> idx(static_cast<size_t>(B), bank_->none());
    std::vector<double> scale(static_cast<size_t>(B), 0.0);
    for (int64_t b = 0; b < B; ++b)
      if (s < routing.of(b).size()) {
        const auto& [i, w] = routing.of(b)[s];
        idx[static_cast<size_t>(b)] = bank_index[static_cast<size_t>(i)];
        scale[static_cast<size_t>(b)] = w;
      }
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
