#include "mdl/core/linear.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "mdl/core/rebuild.h"

namespace mdl {
namespace {

struct LinearFn : torch::autograd::Function<LinearFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& W,
                            const c10::optional<at::Tensor>& bias) {
    const bool has_bias = bias.has_value() && bias->defined();
    at::Tensor y = at::linear(x, W, has_bias ? *bias : at::Tensor());
    // x only for dW; the node's inputs are numbered x, W, bias (when given).
    ctx->save_for_backward({W.requires_grad() ? save_input(ctx, x) : at::Tensor(), W});
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->saved_data["dtype"] = y.scalar_type();  // the product's (autocast may have lowered it)
    ctx->saved_data["x_dtype"] = x.scalar_type();
    if (has_bias) ctx->saved_data["bias_dtype"] = bias->scalar_type();
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& W = saved[1];
    const auto dtype = ctx->saved_data["dtype"].toScalarType();
    const std::vector<int64_t> x_sizes = ctx->saved_data["x_sizes"].toIntVector();
    const int64_t in = W.size(1), out = W.size(0);
    const at::Tensor g = grads[0].reshape({-1, out}).to(dtype);  // (N, out)
    at::Tensor dx, dW, db;
    if (ctx->needs_input_grad(1)) {  // first, so that a rebuilt x is freed before dx is made
      const at::Tensor x = saved_input(ctx, saved[0]);
      dW = at::mm(g.t(), x.reshape({-1, in}).to(dtype)).to(W.scalar_type());  // (out, in)
    }
    if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2))
      db = g.sum(0).to(ctx->saved_data["bias_dtype"].toScalarType());
    if (ctx->needs_input_grad(0))
      dx = at::mm(g, W.to(dtype)).view(x_sizes).to(ctx->saved_data["x_dtype"].toScalarType());  // (..., in)
    return {dx, dW, db};
  }
};

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const bool wants_grad = at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad() ||
                                                         (bias.defined() && bias.requires_grad()));
  if (!wants_grad) return at::linear(x, weight, bias);
  const c10::optional<at::Tensor> b = bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt;
  return LinearFn::apply(x, weight, b);
}

}  // namespace mdl
