#include "mdl/backbones/activation_checkpoint.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <optional>

#include "mdl/core/autocast.h"
#include "mdl/core/error.h"
#include "mdl/core/forward_context.h"
#include "mdl/routing/routing_context.h"
#include "mdl/routing/routing_log.h"

namespace mdl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What backward needs to run the layer again: the function, the random-number state it started from,
// and its forward context with copies of what the context points at.
struct Rerun : torch::CustomClassHolder {
  LayerFn layer;
  ForwardContext context;
  at::Tensor input_ids;
  std::optional<RoutingContext> routing;
  at::Tensor cpu_rng, device_rng;          // generator states before the first run
  c10::ScalarType autocast = c10::kFloat;  // the first run's autocast precision (backward runs outside it)
  bool input_requires_grad = false;
};

at::Generator device_generator(const at::Tensor& x) {
  return x.device().is_cpu() ? at::Generator() : at::globalContext().defaultGenerator(x.device());
}

struct CheckpointFn : torch::autograd::Function<CheckpointFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x,
                            const c10::intrusive_ptr<Rerun>& rerun) {
    ctx->save_for_backward({x});
    ctx->saved_data["rerun"] = c10::IValue::make_capsule(rerun);
    return rerun->layer(x);  // grad mode is off here: nothing is kept
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor x = ctx->get_saved_variables()[0];
    auto rerun = c10::static_intrusive_pointer_cast<Rerun>(ctx->saved_data["rerun"].toCapsule());
    at::Tensor leaf = x.detach().requires_grad_(rerun->input_requires_grad);
    // The same random numbers as the first run, then the state as it was before this rerun.
    at::Generator cpu = at::detail::getDefaultCPUGenerator(), dev = device_generator(x);
    const at::Tensor cpu_now = cpu.get_state(), dev_now = dev.defined() ? dev.get_state() : at::Tensor();
    cpu.set_state(rerun->cpu_rng);
    if (dev.defined()) dev.set_state(rerun->device_rng);
    at::Tensor y;
    {
      at::AutoGradMode grad_on(true);
      ForwardContextGuard guard(rerun->context);
      AutocastGuard autocast(x.device(), rerun->autocast);
      y = rerun->layer(leaf);
    }
    cpu.set_state(cpu_now);
    if (dev.defined()) dev.set_state(dev_now);
    if (y.requires_grad()) torch::autograd::backward({y}, {grads[0]});
    return {rerun->input_requires_grad ? leaf.grad() : at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor checkpointed(const LayerFn& layer, const at::Tensor& x) {
  auto rerun = c10::make_intrusive<Rerun>();
  rerun->layer = layer;
  const ForwardContext& now = ForwardContext::current();
  rerun->context = now;
  rerun->context.routing_log = nullptr;  // statistics are recorded once, by the first run
  if (now.input_ids) rerun->input_ids = *now.input_ids, rerun->context.input_ids = &rerun->input_ids;
  if (now.routing) rerun->routing = *now.routing, rerun->context.routing = &*rerun->routing;
  rerun->cpu_rng = at::detail::getDefaultCPUGenerator().get_state();
  if (at::Generator dev = device_generator(x); dev.defined()) rerun->device_rng = dev.get_state();
  rerun->input_requires_grad = x.requires_grad();
  if (x.is_cuda() ? at::autocast::is_enabled() : at::autocast::is_cpu_enabled())
    rerun->autocast =
        x.is_cuda() ? at::autocast::get_autocast_gpu_dtype() : at::autocast::get_autocast_cpu_dtype();
  // An input that needs no gradient (frozen embeddings under LoRA) still has to lead backward here, or the
  // parameters inside would get none: a detached copy that requires grad does.
  const at::Tensor input = x.requires_grad() ? x : x.detach().requires_grad_(true);
  const size_t logged = now.routing_log ? now.routing_log->stats().size() : 0;
  at::Tensor y = CheckpointFn::apply(input, rerun);
  MDL_CHECK(!now.routing_log || now.routing_log->stats().size() == logged, "[checkpointing] a router at '",
            now.routing_log->stats().back().site,
            "' records an auxiliary loss, which would get no gradient under "
            "gradient checkpointing; train this model without it");
  return y;
}

}  // namespace mdl
