// The dispatch of fixed routings against a loop written here: every row through its modules one by one,
// in its own order, each change weighted. Rows that share a module at a step run as one call; a module
// every row takes runs on the whole batch, and only then may change the shape.
#include "mdl/routing/module_routing.h"

#include <ATen/ATen.h>

#include "test_util.h"

namespace mdl {
namespace {

// Three toy modules that do not commute: what they make of `current` depends on the order.
at::Tensor toy(int64_t m, const at::Tensor& x, const at::Tensor& current) {
  switch (m) {
    case 0:
      return current * 2.0 + 1.0;
    case 1:
      return current + x * x;
    default:
      return at::tanh(current) * 3.0;
  }
}

at::Tensor by_hand(const at::Tensor& x, const at::Tensor& base, const ModuleRouting& r) {
  std::vector<at::Tensor> rows;
  for (int64_t b = 0; b < base.size(0); ++b) {
    at::Tensor cur = base[b].unsqueeze(0), in = x[b].unsqueeze(0);
    for (const auto& [m, w] : r.of(b)) cur = cur + w * (toy(m, in, cur) - cur);
    rows.push_back(cur);
  }
  return at::cat(rows, 0);
}

TEST(ModuleRouting, EachRowRunsItsModulesInItsOrder) {
  at::manual_seed(0);
  const at::Tensor x = at::randn({5, 3, 4}), base = at::randn({5, 3, 4});  // (B, T, C)
  int64_t calls = 0;
  const ModuleStep step = [&](int64_t m, const at::Tensor& in, const at::Tensor& cur) {
    ++calls;
    return toy(m, in, cur);
  };
  const std::vector<ModuleRouting> cases = {
      ModuleRouting::same_for_all(5, {{0, 1.0}, {1, 0.5}, {2, 1.0}}),
      ModuleRouting::same_for_all(5, {{2, 1.0}, {1, 0.5}, {0, 1.0}}),
      ModuleRouting::per_example(
          {{{0, 1.0}, {1, 1.0}}, {{1, 1.0}, {0, 1.0}}, {}, {{2, 0.3}}, {{0, -1.0}, {2, 2.0}, {1, 1.0}}}),
      ModuleRouting::per_example(
          {{{1, 0.5}}, {{1, 2.0}}, {{1, 1.0}}, {{1, 0.0}}, {{1, 1.0}}}),  // all rows, weights differ
      ModuleRouting::per_example({{}, {}, {}, {}, {}}),
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE("case " + std::to_string(i));
    EXPECT_CLOSE(dispatch_in_order(x, base, cases[i], step), by_hand(x, base, cases[i]), 1e-6);
  }
  EXPECT_CHANGED(dispatch_in_order(x, base, cases[0], step), dispatch_in_order(x, base, cases[1], step));
  calls = 0;
  dispatch_in_order(x, base, cases[2], step);
  EXPECT_EQ(calls, 7) << "one call per (step, module): step 0 {0, 1, 2}, step 1 {1, 0, 2}, step 2 {1}";
}

TEST(ModuleRouting, OnlyAModuleEveryRowTakesMayChangeTheShape) {
  const at::Tensor x = at::ones({2, 3, 4}), base = at::zeros({2, 3, 4});
  const ModuleStep prepend = [](int64_t, const at::Tensor&, const at::Tensor& cur) {
    return at::cat({at::ones({cur.size(0), 1, cur.size(2)}), cur}, 1);  // a prompt: one more position
  };
  EXPECT_EQ(dispatch_in_order(x, base, ModuleRouting::same_for_all(2, {{0, 1.0}}), prepend).sizes(),
            (at::IntArrayRef{2, 4, 4}));
  EXPECT_THROW_WITH(dispatch_in_order(x, base, ModuleRouting::per_example({{{0, 1.0}}, {}}), prepend),
                    "changed its rows' shape", "must keep shapes");
  EXPECT_THROW_WITH(dispatch_in_order(x, base, ModuleRouting::per_example({{{0, 1.0}}}), prepend),
                    "routing is for 1 rows but the batch has 2");
}

}  // namespace
}  // namespace mdl
