#include "mdl/modules/lora.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <re2/re2.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/core/fields.h"
#include "mdl/core/linear.h"
#include "mdl/core/rebuild.h"
#include "mdl/core/thin_gemm.h"

namespace mdl {

void to_json(nlohmann::json& j, const LoraOptions& o) {
  j = lora_fields().write(o);
}

const FieldList<LoraOptions>& lora_fields() {
  static const FieldList<LoraOptions> f =
      FieldList<LoraOptions>("lora")
          .add("r", &LoraOptions::r, "rank")
          .add("lora_alpha", &LoraOptions::alpha,
               "scaling numerator: alpha / r (alpha / sqrt(r) with use_rslora)")
          .add("lora_dropout", &LoraOptions::dropout, "dropout on the module's input, training only")
          .add("use_rslora", &LoraOptions::use_rslora, "rank-stabilised scaling alpha / sqrt(r)")
          .add("use_dora", &LoraOptions::use_dora, "weight-decomposed LoRA (DoRA: a magnitude vector)")
          .add(
              "init_lora_weights", [](nlohmann::json& v, const LoraOptions& o) { v = o.init; },
              [](const nlohmann::json& v, LoraOptions& o) {
                o.init = v.is_boolean() ? (v.get<bool>() ? "kaiming" : "random") : v.get<std::string>();
              },
              "A's init: true or kaiming (PEFT's default), gaussian (N(0, 1/r)), false or random (random B, "
              "for tests)")
          .add("lora_bias", &LoraOptions::bias, "a trainable bias on B (PEFT's lora_bias)")
          .add(
              "rank_pattern", [](nlohmann::json& v, const LoraOptions& o) { v = o.rank_pattern; },
              [](const nlohmann::json& v, LoraOptions& o) {
                if (v.is_object()) o.rank_pattern = v.get<std::map<std::string, int64_t>>();
              },
              "site regex -> rank, over r")
          .add(
              "alpha_pattern", [](nlohmann::json& v, const LoraOptions& o) { v = o.alpha_pattern; },
              [](const nlohmann::json& v, LoraOptions& o) {
                if (v.is_object()) o.alpha_pattern = v.get<std::map<std::string, double>>();
              },
              "site regex -> alpha, over lora_alpha")
          .check([](const LoraOptions& o) { validate(o); });
  return f;
}

void validate(const LoraOptions& o) {
  MDL_CHECK(o.r > 0, "[lora] r must be > 0, got ", o.r);
  MDL_CHECK(o.dropout >= 0 && o.dropout < 1, "[lora] lora_dropout must be in [0, 1), got ", o.dropout);
  MDL_CHECK(!(o.use_dora && o.bias), "[lora] use_dora with lora_bias is not supported (as in PEFT)");
  MDL_CHECK(o.init == "kaiming" || o.init == "gaussian" || o.init == "random", "[lora] init_lora_weights '",
            o.init, "' is unknown; expected true (kaiming), \"gaussian\" or false (random B, for tests)");
}

void from_json(const nlohmann::json& j, LoraOptions& o) {
  o = lora_fields().read(j);
}

// PEFT matches pattern keys as a regex against the end of the module name (after a '.').
static bool pattern_matches(const std::string& pattern, const std::string& site) {
  return RE2::FullMatch(site, "(.*\\.)?(?:" + pattern + ")");
}

std::pair<int64_t, double> LoraOptions::rank_alpha_for(const std::string& site) const {
  int64_t rank = r;
  double a = alpha;
  for (const auto& [p, v] : rank_pattern)
    if (pattern_matches(p, site)) rank = v;
  for (const auto& [p, v] : alpha_pattern)
    if (pattern_matches(p, site)) a = v;
  return {rank, a};
}

double LoraOptions::scaling(int64_t rank, double alpha_value) const {
  return use_rslora ? alpha_value / std::sqrt(static_cast<double>(rank))
                    : alpha_value / static_cast<double>(rank);
}

namespace {

// The products of LoRA's training nodes, shared by both; each has one dimension r, so it goes through
// thin_mm (oneDNN on CPU float32: 1.5-2.5x faster than OpenBLAS for these shapes). Measured at N = 1024,
// r = 16 on one thread, oneDNN runs x A^T, g B and the products with an (r, N) left operand fastest;
// hence the small (N, r) results are transposed to (r, N) (a copy of r N floats) before dA and dB.
// x A^T (N, r) from x2 (N, in).
at::Tensor low_rank_input(const at::Tensor& x2, const at::Tensor& A) {
  return thin_mm(x2, A.to(x2.scalar_type()).t());
}
// s g B (N, r): where dA and LoRA's part of dx start; g (N, out) in the compute dtype.
at::Tensor scaled_gb(const at::Tensor& g, const at::Tensor& B, double s) {
  return thin_mm(g, B.to(g.scalar_type()), s);
}
// dA = s (g B)^T x (r, in), from gb (N, r) and x (N, in).
at::Tensor grad_A(const at::Tensor& gb, const at::Tensor& x2, const at::Tensor& A) {
  return thin_mm(gb.t().contiguous(), x2.to(gb.scalar_type())).to(A.scalar_type());
}
// dB = s g^T (x A^T) (out, r), from xa = x A^T (N, r).
at::Tensor grad_B(const at::Tensor& xa, const at::Tensor& g, double s, const at::Tensor& B) {
  return thin_mm(xa.t().contiguous(), g, s).t().contiguous().to(B.scalar_type());
}

// current + s (x A^T) B^T as one autograd node, for training plain LoRA where it does not fold into its
// projection (dropout, other modules at the site, few rows). Saves x, or what rebuilds it (core/rebuild.h),
// and x A^T (N, r).
struct LoraDeltaFn : torch::autograd::Function<LoraDeltaFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& current, const at::Tensor& A, const at::Tensor& B, double s) {
    const int64_t in = A.size(1), out = B.size(0);
    const at::Tensor x2 = x.reshape({-1, in});    // (N, in)
    const at::Tensor xa = low_rank_input(x2, A);  // (N, r)
    const at::Tensor y =
        thin_addmm(current.reshape({-1, out}), xa, B.to(xa.scalar_type()).t(), s);  // (N, out)
    ctx->save_for_backward({save_input(ctx, x), xa, A, B});
    ctx->saved_data["s"] = s;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->saved_data["x_dtype"] = x.scalar_type();
    return y.view(current.sizes());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &xa = saved[1], &A = saved[2], &B = saved[3];
    const double s = ctx->saved_data["s"].toDouble();
    const auto dtype = xa.scalar_type();  // the forward's (autocast may have lowered it)
    const at::Tensor g = grads[0].reshape({-1, B.size(0)}).to(dtype);  // (N, out)
    const at::Tensor gb = scaled_gb(g, B, s);                          // (N, r)
    at::Tensor dx, dA, dB;
    if (ctx->needs_input_grad(0))
      dx = thin_mm(gb, A.to(dtype))
               .view(ctx->saved_data["x_sizes"].toIntVector())
               .to(ctx->saved_data["x_dtype"].toScalarType());
    if (ctx->needs_input_grad(2))
      dA = grad_A(gb, saved_input(ctx, saved[0]).reshape({-1, A.size(1)}), A);  // x (N, in), kept or rebuilt
    if (ctx->needs_input_grad(3)) dB = grad_B(xa, g, s, B);
    return {dx, ctx->needs_input_grad(1) ? grads[0] : at::Tensor(), dA, dB, at::Tensor()};
  }
};

// W + s B A (out, in) in the weights' precision, as merge() computes it; autocast then lowers it for the
// product as it would lower W.
at::Tensor merged_weight(const at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double s) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      c10::DispatchKeySet({c10::DispatchKey::AutocastCPU, c10::DispatchKey::AutocastCUDA}));
  return thin_addmm(W, B, A, s);
}

// x (W + s B A)^T + b as one autograd node: a training LoRA folded into its projection. Forward builds
// the merged (out, in) weight (as merge() does, for this call only) and takes one GEMM; backward takes
// dx = g (W + s B A) as one GEMM too (no separate add of two (N, in) gradients), and dA, dB from the thin
// products through the helpers above. On the small preset at N = 1024 rows (42 projections) a training
// step spends ~36 ms in LoRA's own products here (merged weights 5.8, the low-rank part of dx 4.9, g B 5.5,
// dA 7.4, x A^T 5, dB 6.8) against ~225 ms in the frozen projections' products; LoraDeltaFn after the
// projection made the step 3-4% slower. x A^T is recomputed in backward rather than kept (r x N: cheap), so a
// checkpointed layer's forward runs do not pay for it twice. Saves x (or what rebuilds it: core/rebuild.h),
// W, A, B: nothing of size (N, out), and no merged weight between forward and backward.
struct LoraLinearFn : torch::autograd::Function<LoraLinearFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& W,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                            double s) {
    at::Tensor y = at::linear(x, merged_weight(W, A, B, s), bias.has_value() ? *bias : at::Tensor());
    ctx->save_for_backward({save_input(ctx, x), W, A, B});
    ctx->saved_data["s"] = s;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["dtype"] = y.scalar_type();  // the product's (autocast may have lowered it)
    if (bias.has_value() && bias->defined()) ctx->saved_data["bias_dtype"] = bias->scalar_type();
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &W = saved[1], &A = saved[2], &B = saved[3];
    const double s = ctx->saved_data["s"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const auto dtype = ctx->saved_data["dtype"].toScalarType();
    // Autograd numbers only the tensors given: an absent bias shifts A and B down by one.
    const size_t ia = has_bias ? 3 : 2;
    const int64_t in = W.size(1), out = W.size(0);
    const at::Tensor g = grads[0].reshape({-1, out}).to(dtype);  // (N, out)
    const bool want_dx = ctx->needs_input_grad(0), fold_dx = out < g.size(0);
    at::Tensor gb;  // (N, r) = s g B, for dA and the unfolded dx
    if (ctx->needs_input_grad(ia) || (want_dx && !fold_dx)) gb = scaled_gb(g, B, s);
    at::Tensor dx, dW, db, dA, dB;
    // First what needs x (kept or rebuilt), which is then freed before dx is made: a rebuilt input and dx
    // are never held together.
    if (ctx->needs_input_grad(1) || ctx->needs_input_grad(ia) || ctx->needs_input_grad(ia + 1)) {
      const at::Tensor x2 = saved_input(ctx, saved[0]).reshape({-1, in}).to(dtype);  // (N, in)
      if (ctx->needs_input_grad(1)) dW = at::mm(g.t(), x2).to(W.scalar_type());      // (out, in)
      if (ctx->needs_input_grad(ia)) dA = grad_A(gb, x2, A);
      if (ctx->needs_input_grad(ia + 1)) dB = grad_B(low_rank_input(x2, A), g, s, B);  // x A^T again
    }
    if (has_bias && ctx->needs_input_grad(2)) db = g.sum(0).to(ctx->saved_data["bias_dtype"].toScalarType());
    if (want_dx) {
      // dx = g (W + s B A). Rebuilding the merged weight (out, in) costs less than adding the low-rank
      // part over the (N, in) result when out < N (measured at N = 1024: down_proj 0.20 vs 0.55 ms, the
      // 128-wide k/v 0.04 vs 0.16), more when out >= N (gate/up 0.26 vs 0.17).
      if (fold_dx) {
        dx = at::mm(g, merged_weight(W, A, B, s).to(dtype));  // (N, in)
      } else {
        dx = at::mm(g, W.to(dtype));  // (N, in)
        thin_addmm_(dx, gb, A.to(dtype), 1.0);
      }
      dx = dx.view(ctx->saved_data["x_sizes"].toIntVector()).to(ctx->saved_data["x_dtype"].toScalarType());
    }
    return {dx, dW, db, dA, dB, at::Tensor()};
  }
};

}  // namespace

LoraImpl::LoraImpl(SiteLinearImpl& base, const LoraOptions& o, uint64_t seed) : options(o), base_(&base) {
  const SiteInfo& info = base.site()->info();
  MDL_CHECK(info.kind == SiteKind::linear, "[lora] '", info.name, "' is not a linear site");
  std::tie(rank, alpha) = o.rank_alpha_for(info.name);
  MDL_CHECK(rank > 0, "[lora] rank for '", info.name, "' must be > 0, got ", rank);
  scaling = o.scaling(rank, alpha);
  const int64_t in = info.in_features, out = info.out_features;
  auto gen = at::detail::createCPUGenerator(seed);
  at::Tensor a = at::empty({rank, in});
  if (o.init == "gaussian") {
    a.normal_(0.0, 1.0 / static_cast<double>(rank), gen);
  } else {
    const double bound =
        1.0 / std::sqrt(static_cast<double>(in));  // kaiming_uniform(a=sqrt(5)), as nn.Linear
    a.uniform_(-bound, bound, gen);
  }
  at::Tensor b = at::zeros({out, rank});
  if (o.init == "random") b.uniform_(-0.1, 0.1, gen);  // non-zero B: only for tests of the equations
  const auto opts = base.weight.options();
  A = register_parameter("lora_A", a.to(opts));
  B = register_parameter("lora_B", b.to(opts));
  if (o.bias) lora_bias = register_parameter("lora_bias", at::zeros({out}, opts));
  if (o.use_dora) {
    magnitude =
        register_parameter("lora_magnitude_vector", base.weight.detach().norm(2, {1}).to(opts));  // (out)
  }
}

at::Tensor LoraImpl::delta_weight() const {
  return scaling * at::matmul(B, A);
}  // (out, in)

bool LoraImpl::low_rank(at::Tensor& a, at::Tensor& b, double& s) const {
  if (!plain() || (options.dropout > 0 && is_training())) return false;
  a = A, b = B, s = scaling;
  return true;
}

at::Tensor LoraImpl::forward(const at::Tensor& input, const at::Tensor& current) {
  at::Tensor x = input;
  if (options.dropout > 0 && is_training()) x = at::dropout(x, options.dropout, true);
  // In training, plain LoRA always takes the node, gradient or not: a checkpointed layer's first run (no
  // gradient) and its rerun must compute the same values.
  if (plain() && is_training()) return LoraDeltaFn::apply(x, current, A, B, scaling);
  if (plain() && current.is_contiguous() && !current.requires_grad()) {
    // Evaluation: current + s (x A^T) B^T as one GEMM with beta = 1, alpha = s, no separate scale and add
    // passes; only when no gradient flows back through `current` (addmm's backward there is slow).
    const int64_t in = A.size(1), out = B.size(0);
    at::Tensor xa = thin_mm(x.reshape({-1, in}), A.t());  // (N, r)
    return thin_addmm(current.reshape({-1, out}), xa, B.t(), scaling).view(current.sizes());
  }
  // s (B (A x) + c): the scaling goes into B and c (tiny) rather than over the (..., out) result.
  at::Tensor lora =
      at::linear(at::linear(x, A), B * scaling, lora_bias.defined() ? lora_bias * scaling : lora_bias);
  if (!magnitude.defined()) return current + lora;
  // DoRA: y = f * (W x + s B A x) + b with f = m / ||W + s B A||_row, written as PEFT does on top of the
  // current output W x + b.
  at::Tensor f = magnitude / (base_->weight + delta_weight()).norm(2, {1}).detach();  // (out)
  at::Tensor wx = base_->bias.defined() ? current - base_->bias : current;
  return current + (f - 1) * wx + f * lora;
}

at::Tensor LoraImpl::forward_linear(const at::Tensor& input, const at::Tensor& weight,
                                    const at::Tensor& bias) {
  const int64_t in = weight.size(1), out = weight.size(0), rows = input.numel() / std::max<int64_t>(in, 1);
  // Building W + s B A costs out * in * r multiply-adds, the low-rank products rows * (in + out) * r:
  // the merged form wins from rows * (in + out) >= out * in (192 rows at 384 x 384). Dropout in training
  // acts on LoRA's input only, so it keeps the low-rank route. The base weights are never modified.
  const bool fold = plain() && rows * (in + out) >= out * in && !(is_training() && options.dropout > 0);
  if (!fold) return forward(input, linear(input, weight, bias));
  const bool wants_grad =
      at::GradMode::is_enabled() && (input.requires_grad() || weight.requires_grad() || A.requires_grad() ||
                                     B.requires_grad() || (bias.defined() && bias.requires_grad()));
  if (!wants_grad)
    return at::linear(input, merged_weight(weight, A, B, scaling), bias);  // the node's forward
  const c10::optional<at::Tensor> b = bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt;
  return LoraLinearFn::apply(input, weight, b, A, B, scaling);
}

void LoraImpl::merge() {
  torch::NoGradGuard g;
  SiteLinearImpl& base = *base_;
  at::Tensor delta = delta_weight().to(base.weight.scalar_type());
  if (lora_bias.defined()) {
    MDL_CHECK(base.bias.defined(), "[lora] cannot merge lora_bias into '", base.site()->name(),
              "', which has no bias");
    base.bias.add_(scaling * lora_bias);
  }
  if (magnitude.defined()) {
    at::Tensor combined = base.weight + delta;
    merged_scale_ = (magnitude / combined.norm(2, {1})).detach();  // (out)
    base.weight.copy_(combined * merged_scale_.unsqueeze(1));
  } else {
    base.weight.add_(delta);
  }
}

void LoraImpl::unmerge() {
  torch::NoGradGuard g;
  SiteLinearImpl& base = *base_;
  at::Tensor delta = delta_weight().to(base.weight.scalar_type());
  if (magnitude.defined()) {
    MDL_CHECK(merged_scale_.defined(), "[lora] DoRA at '", base.site()->name(), "' was not merged");
    base.weight.copy_(base.weight / merged_scale_.unsqueeze(1) - delta);
    merged_scale_ = at::Tensor();
  } else {
    base.weight.sub_(delta);
  }
  if (lora_bias.defined()) base.bias.sub_(scaling * lora_bias);
}

}  // namespace mdl
