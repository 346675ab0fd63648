#include "mdl/routing/module_routing.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <map>
#include <optional>

#include "mdl/core/error.h"
#include "mdl/core/forward_context.h"
#include "mdl/routing/routing_context.h"

namespace mdl {
RowsContext::RowsContext(const at::Tensor& idx, const std::vector<int64_t>& rows)
    : context_(ForwardContext::current()) {
  if (const RoutingContext* rc = context_.routing) {
    auto narrow = [&](const at::Tensor& t) {
      return t.defined() ? t.index_select(0, idx.to(t.device())) : t;
    };
    routing_.task_ids = narrow(rc->task_ids);
    routing_.language_ids = narrow(rc->language_ids);
    if (!rc->modules.empty())
      for (int64_t b : rows) routing_.modules.push_back(rc->modules.at(static_cast<size_t>(b)));
    context_.routing = &routing_;
  }
  if (context_.input_ids && context_.input_ids->defined()) {
    input_ids_ = context_.input_ids->index_select(0, idx.to(context_.input_ids->device()));
    context_.input_ids = &input_ids_;
  }
  guard_.emplace(context_);
}

namespace {
std::vector<int64_t> host_examples(const at::Tensor& tokens, int64_t T, const ForwardContext& ctx) {
  if (!ctx.routing || ctx.routing->modules.empty()) return {};  // only module lists are read on the host
  at::Tensor e = at::div(tokens, T, "floor").to(at::kCPU, at::kLong).contiguous();
  return std::vector<int64_t>(e.data_ptr<int64_t>(), e.data_ptr<int64_t>() + e.numel());
}
}  // namespace

RowsContext::RowsContext(const at::Tensor& tokens, int64_t T)
    : RowsContext(at::div(tokens, T, "floor"), host_examples(tokens, T, ForwardContext::current())) {
  // input_ids_ holds the examples' rows (n, T); each row here is one token: keep its own id, (n, 1).
  if (input_ids_.defined() && input_ids_.dim() == 2 && input_ids_.size(1) == T)
    input_ids_ = input_ids_.gather(1, at::remainder(tokens, T).to(input_ids_.device()).unsqueeze(1));
}

ModuleRouting ModuleRouting::same_for_all(int64_t rows, std::vector<Choice> choices) {
  ModuleRouting r;
  r.rows = rows;
  r.shared = std::move(choices);
  return r;
}

ModuleRouting ModuleRouting::per_example(std::vector<std::vector<Choice>> per_row) {
  ModuleRouting r;
  r.rows = static_cast<int64_t>(per_row.size());
  r.per_row = std::move(per_row);
  return r;
}

size_t ModuleRouting::steps() const {
  if (is_shared()) return shared.size();
  size_t n = 0;
  for (const auto& row : per_row) n = std::max(n, row.size());
  return n;
}

bool ModuleRouting::empty() const {
  return steps() == 0;
}

at::Tensor dispatch_in_order(const at::Tensor& input, const at::Tensor& base, const ModuleRouting& r,
                             const ModuleStep& step) {
  const int64_t B = base.size(0);
  MDL_CHECK(r.rows == B, "[dispatch] the routing is for ", r.rows, " rows but the batch has ", B);
  at::Tensor out = base;
  for (size_t s = 0; s < r.steps(); ++s) {
    // This step's rows of each module, in row order, with their weights.
    std::map<int64_t, std::pair<std::vector<int64_t>, std::vector<double>>> groups;
    for (int64_t b = 0; b < B; ++b) {
      const auto& choices = r.of(b);
      if (s >= choices.size()) continue;
      auto& g = groups[choices[s].first];
      g.first.push_back(b);
      g.second.push_back(choices[s].second);
      if (r.is_shared()) {  // every row the same: one entry stands for all
        g.first.assign(1, -1);
        break;
      }
    }
    for (const auto& [module, g] : groups) {
      const auto& [rows, weights] = g;
      const bool all = rows.size() == 1 && rows[0] == -1 ? true : static_cast<int64_t>(rows.size()) == B;
      const bool uniform =
          std::all_of(weights.begin(), weights.end(), [&](double w) { return w == weights[0]; });
      if (all && uniform) {
        at::Tensor next = step(module, input, out);
        const double w = weights[0];
        // A module that lengthens the sequence (a prompt) is on or off; weights scale same-shape changes.
        out = w == 1.0 || next.sizes() != out.sizes() ? next : out + w * (next - out);
        continue;
      }
      at::Tensor idx =
          all ? at::Tensor() : at::tensor(rows, at::TensorOptions().dtype(at::kLong)).to(base.device());
      at::Tensor sub_in = all ? input : input.index_select(0, idx);
      at::Tensor sub = all ? out : out.index_select(0, idx);
      at::Tensor next;
      if (all) {
        next = step(module, sub_in, sub);
      } else {
        RowsContext rows_context(idx, rows);
        next = step(module, sub_in, sub);
      }
      MDL_CHECK(next.sizes() == sub.sizes(), "[dispatch] module ", module, " changed its rows' shape from ",
                sub.sizes(), " to ", next.sizes(),
                "; modules chosen per row must keep shapes (a prompt cannot be)");
      std::vector<int64_t> view(static_cast<size_t>(base.dim()), 1);
      view[0] = static_cast<int64_t>(weights.size());
      at::Tensor w =
          at::tensor(weights, at::TensorOptions().dtype(at::kDouble)).to(base.device(), base.scalar_type());
      at::Tensor change = w.view(view) * (next - sub);
      out = all ? out + change : out.index_add(0, idx, change);
    }
  }
  return out;
}

}  // namespace mdl
