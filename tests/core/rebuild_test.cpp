// core/rebuild and core/linear: a projection's node keeps what rebuilds its input rather than the input,
// the input's memory is freed after the forward pass, and every gradient equals at::linear's.
#include "mdl/core/rebuild.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "mdl/core/linear.h"
#include "test_util.h"

namespace mdl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::CppNode;
using torch::autograd::variable_list;

int rebuilds = 0;

// y = 2 x, keeping x for its backward: its output can be computed again from what it keeps.
struct DoubleFn : torch::autograd::Function<DoubleFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    ctx->save_for_backward({x});
    return x * 2;
  }
  static variable_list backward(AutogradContext*, variable_list grads) { return {grads[0] * 2}; }
  static at::Tensor rebuild(torch::autograd::Node& node) {
    ++rebuilds;
    return static_cast<CppNode<DoubleFn>&>(node).ctx_.get_saved_variables()[0] * 2;
  }
};

// The same op with a rebuild that gets the shape wrong.
struct WrongShapeFn : torch::autograd::Function<WrongShapeFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    ctx->save_for_backward({x});
    return x * 2;
  }
  static variable_list backward(AutogradContext*, variable_list grads) { return {grads[0] * 2}; }
  static at::Tensor rebuild(torch::autograd::Node& node) {
    return static_cast<CppNode<WrongShapeFn>&>(node).ctx_.get_saved_variables()[0].narrow(0, 0, 1);
  }
};

// Keeps both of its inputs through save_input: one node can keep only one input's Rebuild.
struct TwoInputsFn : torch::autograd::Function<TwoInputsFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& a, const at::Tensor& b) {
    ctx->save_for_backward({save_input(ctx, a), save_input(ctx, b)});
    return a + b;
  }
  static variable_list backward(AutogradContext*, variable_list grads) { return {grads[0], grads[0]}; }
};

at::Tensor doubled(const at::Tensor& x) {
  static const bool registered = (register_rebuild(typeid(CppNode<DoubleFn>), &DoubleFn::rebuild), true);
  (void)registered;
  return DoubleFn::apply(x);
}

// Drops `t` and says whether its memory went with it (nothing else, no saved tensor, holds its storage).
bool freed_when_dropped(at::Tensor& t) {
  c10::weak_intrusive_ptr<c10::StorageImpl> weak = t.storage().getWeakStorageImpl();
  t.reset();
  return weak.expired();
}

TEST(Rebuild, ProjectionKeepsTheRebuildNotItsInput) {
  at::manual_seed(0);
  const at::Tensor x0 = at::randn({3, 4, 6}), W0 = at::randn({5, 6}), b0 = at::randn({5}),
                   dy = at::randn({3, 4, 5});
  // mdl::linear on a rebuildable input: the input is freed after the forward pass, and rebuilt once.
  at::Tensor x = x0.clone().requires_grad_(), W = W0.clone().requires_grad_(),
             b = b0.clone().requires_grad_();
  at::Tensor h = doubled(x);
  ASSERT_TRUE(rebuild_of(h));
  at::Tensor y = linear(h, W, b);
  EXPECT_TRUE(freed_when_dropped(h));
  rebuilds = 0;
  y.backward(dy);
  EXPECT_EQ(rebuilds, 1);
  // The reference: at::linear, which keeps its input.
  at::Tensor xr = x0.clone().requires_grad_(), Wr = W0.clone().requires_grad_(),
             br = b0.clone().requires_grad_();
  at::Tensor hr = doubled(xr);
  at::Tensor yr = at::linear(hr, Wr, br);
  EXPECT_FALSE(freed_when_dropped(hr));
  yr.backward(dy);
  EXPECT_TRUE(at::equal(y, yr));
  EXPECT_TRUE(at::allclose(x.grad(), xr.grad(), 1e-6, 1e-6));
  EXPECT_TRUE(at::allclose(W.grad(), Wr.grad(), 1e-6, 1e-6));
  EXPECT_TRUE(at::allclose(b.grad(), br.grad(), 1e-6, 1e-6));
}

TEST(Rebuild, FrozenWeightKeepsNoInputAtAll) {
  // dx needs only W: any input, rebuildable or not, is freed after the forward pass.
  at::Tensor x = at::randn({4, 6}).requires_grad_(), W = at::randn({5, 6});
  at::Tensor h = x * 3;  // an at:: op: not rebuildable
  EXPECT_FALSE(rebuild_of(h));
  at::Tensor y = linear(h, W, at::Tensor());
  EXPECT_TRUE(freed_when_dropped(h));
  y.sum().backward();
  EXPECT_TRUE(at::allclose(x.grad(), 3 * at::ones({4, 5}).mm(W), 1e-6, 1e-6));
  // Trained W on an input that cannot be rebuilt: the input is kept.
  at::Tensor Wt = W.clone().requires_grad_();
  at::Tensor h2 = x * 3;
  at::Tensor y2 = linear(h2, Wt, at::Tensor());
  EXPECT_FALSE(freed_when_dropped(h2));
  y2.sum().backward();
  EXPECT_TRUE(at::allclose(Wt.grad(), at::ones({5, 4}).mm(x.detach() * 3), 1e-6, 1e-6));
}

TEST(Rebuild, OnlyTheUnchangedOutputItselfIsRebuildable) {
  at::Tensor x = at::randn({4, 6}).requires_grad_();
  EXPECT_TRUE(rebuild_of(doubled(x)));
  EXPECT_FALSE(rebuild_of(doubled(x).view({6, 4})));  // a view
  EXPECT_FALSE(rebuild_of(doubled(x).mul_(2)));       // changed in place: another node made it
  EXPECT_FALSE(rebuild_of(doubled(x.detach())));      // no graph
  EXPECT_FALSE(rebuild_of(at::Tensor()));
  {
    torch::NoGradGuard no_grad;
    EXPECT_FALSE(rebuild_of(doubled(x)));
  }
}

TEST(Rebuild, WrongShapeFromARebuildIsAnError) {
  register_rebuild(typeid(CppNode<WrongShapeFn>), &WrongShapeFn::rebuild);
  at::Tensor x = at::randn({4, 6}).requires_grad_(), W = at::randn({5, 6}).requires_grad_();
  at::Tensor y = linear(WrongShapeFn::apply(x), W, at::Tensor());
  EXPECT_THROW_WITH(y.sum().backward(),
                    "WrongShapeFn> rebuilt a [1, 6] tensor where the forward pass made [4, 6]");
}

TEST(Rebuild, OneRebuildPerNode) {
  at::Tensor x = at::randn({4, 6}).requires_grad_();
  EXPECT_THROW_WITH(TwoInputsFn::apply(doubled(x), doubled(x)),
                    "[rebuild] save_input was called twice on one node");
  EXPECT_NO_THROW(TwoInputsFn::apply(doubled(x), x * 3));  // the second is kept as it is
}

}  // namespace
}  // namespace mdl
