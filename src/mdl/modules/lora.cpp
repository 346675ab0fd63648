#include "mdl/modules/lora.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <re2/re2.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"

namespace mdl {

void to_json(nlohmann::json& j, const LoraOptions& o) {
  j = {{"r", o.r}, {"lora_alpha", o.alpha}, {"lora_dropout", o.dropout}, {"use_rslora", o.use_rslora},
       {"use_dora", o.use_dora}, {"init_lora_weights", o.init}, {"lora_bias", o.bias},
       {"rank_pattern", o.rank_pattern}, {"alpha_pattern", o.alpha_pattern}};
}

void from_json(const nlohmann::json& j, LoraOptions& o) {
  o = LoraOptions();
  o.r = j.value("r", o.r);
  o.alpha = j.value("lora_alpha", o.alpha);
  o.dropout = j.value("lora_dropout", o.dropout);
  o.use_rslora = j.value("use_rslora", o.use_rslora);
  o.use_dora = j.value("use_dora", o.use_dora);
  if (j.contains("init_lora_weights")) {
    const auto& init = j["init_lora_weights"];
    o.init = init.is_boolean() ? (init.get<bool>() ? "kaiming" : "random") : init.get<std::string>();
  }
  o.bias = j.value("lora_bias", o.bias);
  if (j.contains("rank_pattern") && j["rank_pattern"].is_object()) o.rank_pattern = j["rank_pattern"].get<std::map<std::string, int64_t>>();
  if (j.contains("alpha_pattern") && j["alpha_pattern"].is_object()) o.alpha_pattern = j["alpha_pattern"].get<std::map<std::string, double>>();
  MDL_CHECK(o.r > 0, "[lora] r must be > 0, got ", o.r);
  MDL_CHECK(o.dropout >= 0 && o.dropout < 1, "[lora] lora_dropout must be in [0, 1), got ", o.dropout);
  MDL_CHECK(!(o.use_dora && o.bias), "[lora] use_dora with lora_bias is not supported (as in PEFT)");
  MDL_CHECK(o.init == "kaiming" || o.init == "gaussian" || o.init == "random", "[lora] init_lora_weights '", o.init,
            "' is unknown; expected true (kaiming), \"gaussian\" or false (random B, for tests)");
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
  return use_rslora ? alpha_value / std::sqrt(static_cast<double>(rank)) : alpha_value / static_cast<double>(rank);
}

namespace {

// current + s (x A^T) B^T as one autograd node, for training plain LoRA. Every product is taken in the
// orientation OpenBLAS runs fastest for these thin shapes (r rows, N columns): measured at N = 1024,
// in = 384, out = 1024, r = 16 on 2 threads, A x^T 0.15 ms vs x A^T 0.24, B^T g^T 0.37 vs g B 0.61,
// (x A^T)^T g 0.35 vs g^T (x A^T) 0.77, which autograd's own backward of two linears uses. Saves x
// (the base projection saves it too: the same storage) and (x A^T)^T (r, N).
struct LoraDeltaFn : torch::autograd::Function<LoraDeltaFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& current, const at::Tensor& A, const at::Tensor& B, double s) {
    const int64_t in = A.size(1), out = B.size(0);
    const at::Tensor x2 = x.reshape({-1, in});                                            // (N, in)
    const at::Tensor xa_t = at::mm(A, x2.t());                                            // (r, N)
    const at::Tensor y = at::addmm(current.reshape({-1, out}), xa_t.t(), B.t(), 1.0, s);  // (N, out)
    ctx->save_for_backward({x2, xa_t, A, B});
    ctx->saved_data["s"] = s;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    return y.view(current.sizes());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x2 = saved[0], &xa_t = saved[1], &A = saved[2], &B = saved[3];
    const double s = ctx->saved_data["s"].toDouble();
    const auto dtype = xa_t.scalar_type();  // the forward's (autocast may have lowered it)
    const at::Tensor g = grads[0].reshape({-1, B.size(0)}).to(dtype);  // (N, out)
    const at::Tensor gb_t = at::mm(B.to(dtype).t(), g.t()).mul_(s);    // (r, N) = s (g B)^T
    at::Tensor dx, dA, dB;
    if (ctx->needs_input_grad(0))
      dx = at::mm(gb_t.t(), A.to(dtype)).view(ctx->saved_data["x_sizes"].toIntVector()).to(x2.scalar_type());
    if (ctx->needs_input_grad(2)) dA = at::mm(gb_t, x2.to(dtype)).to(A.scalar_type());  // (r, in)
    if (ctx->needs_input_grad(3))
      dB = at::mm(xa_t, g).mul_(s).t().contiguous().to(B.scalar_type());  // (out, r)
    return {dx, ctx->needs_input_grad(1) ? grads[0] : at::Tensor(), dA, dB, at::Tensor()};
  }
};

}  // namespace

LoraImpl::LoraImpl(SiteLinearImpl& base, const LoraOptions& o, uint64_t seed)
    : options(o), base_(&base) {
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
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));  // kaiming_uniform(a=sqrt(5)), as nn.Linear
    a.uniform_(-bound, bound, gen);
  }
  at::Tensor b = at::zeros({out, rank});
  if (o.init == "random") b.uniform_(-0.1, 0.1, gen);  // non-zero B: only for tests of the equations
  const auto opts = base.weight.options();
  A = register_parameter("lora_A", a.to(opts));
  B = register_parameter("lora_B", b.to(opts));
  if (o.bias) lora_bias = register_parameter("lora_bias", at::zeros({out}, opts));
  if (o.use_dora) {
    magnitude = register_parameter("lora_magnitude_vector", base.weight.detach().norm(2, {1}).to(opts));  // (out)
  }
}

at::Tensor LoraImpl::delta_weight() const { return scaling * at::matmul(B, A); }  // (out, in)

bool LoraImpl::low_rank(at::Tensor& a, at::Tensor& b, double& s) const {
  if (magnitude.defined() || lora_bias.defined() || (options.dropout > 0 && is_training())) return false;
  a = A, b = B, s = scaling;
  return true;
}

at::Tensor LoraImpl::forward(const at::Tensor& input, const at::Tensor& current) {
  at::Tensor x = input;
  if (options.dropout > 0 && is_training()) x = at::dropout(x, options.dropout, true);
  // In training, plain LoRA always takes the node, gradient or not: a checkpointed layer's first run (no
  // gradient) and its rerun must compute the same values.
  if (!magnitude.defined() && !lora_bias.defined() && is_training())
    return LoraDeltaFn::apply(x, current, A, B, scaling);
  if (!magnitude.defined() && !lora_bias.defined() && current.is_contiguous() && !current.requires_grad()) {
    // Evaluation: current + s (x A^T) B^T as one GEMM with beta = 1, alpha = s, no separate scale and add
    // passes; only when no gradient flows back through `current` (addmm's backward there is slow).
    const int64_t out = B.size(0);
    at::Tensor xa = at::linear(x, A).reshape({-1, A.size(0)});  // (N, r)
    return at::addmm(current.reshape({-1, out}), xa, B.t(), 1.0, scaling).view(current.sizes());
  }
  // s (B (A x) + c): the scaling goes into B and c (tiny) rather than over the (..., out) result.
  at::Tensor lora = at::linear(at::linear(x, A), B * scaling, lora_bias.defined() ? lora_bias * scaling : lora_bias);
  if (!magnitude.defined()) return current + lora;
  // DoRA: y = f * (W x + s B A x) + b with f = m / ||W + s B A||_row, written as PEFT does on top of the
  // current output W x + b.
  at::Tensor f = magnitude / (base_->weight + delta_weight()).norm(2, {1}).detach();  // (out)
  at::Tensor wx = base_->bias.defined() ? current - base_->bias : current;
  return current + (f - 1) * wx + f * lora;
}

void LoraImpl::merge() {
  torch::NoGradGuard g;
  SiteLinearImpl& base = *base_;
  at::Tensor delta = delta_weight().to(base.weight.scalar_type());
  if (lora_bias.defined()) {
    MDL_CHECK(base.bias.defined(), "[lora] cannot merge lora_bias into '", base.site()->name(), "', which has no bias");
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
