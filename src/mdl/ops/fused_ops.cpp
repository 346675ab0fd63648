#include "mdl/ops/fused_ops.h"

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "mdl/core/error.h"
#include "mdl/core/rebuild.h"

namespace mdl::fn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::CppNode;
using torch::autograd::variable_list;

// True where the hand-written loops apply: float32, contiguous, on the CPU.
bool cpu_float(const at::Tensor& t) {
  return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous();
}

// ---- RMSNorm ------------------------------------------------------------------------------------------

// One row of the output, y = w * (x * k) with k = 1/rms: the forward's loop and a rebuild's run this same
// arithmetic, so a rebuilt output equals the forward's to the last bit.
inline void rms_norm_row(const float* x, const float* w, float k, int64_t C, float* y) {
  for (int64_t i = 0; i < C; ++i) y[i] = w[i] * (x[i] * k);
}

// y = w * x * rstd from the per-row 1/rms: the forward's output, and the same values again when a
// consumer rebuilds it (core/rebuild.h).
at::Tensor rms_norm_output(const at::Tensor& x, const at::Tensor& w, const at::Tensor& rstd) {
  const int64_t C = x.size(-1), rows = rstd.size(0);
  if (cpu_float(x) && cpu_float(w)) {
    at::Tensor y = at::empty_like(x);
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *rp = rstd.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    for (int64_t r = 0; r < rows; ++r) rms_norm_row(xp + r * C, wp, rp[r], C, yp + r * C);
    return y;
  }
  std::vector<int64_t> row_shape = x.sizes().vec();
  row_shape.back() = 1;
  return w * (x.to(at::kFloat) * rstd.view(row_shape)).to(x.scalar_type());
}

constexpr const char* kRebuilt = "rebuilt";  // RMSNorm's output rebuilt by its first consumer's backward

struct RmsNormFn : torch::autograd::Function<RmsNormFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, double eps) {
    const int64_t C = x.size(-1), rows = x.numel() / std::max<int64_t>(C, 1);
    at::Tensor rstd, y;  // rstd (rows) float32
    if (cpu_float(x) && cpu_float(w)) {
      // One pass per row: the row is still in cache for its output.
      rstd = at::empty({rows}, x.options());
      y = at::empty_like(x);
      const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
      float *yp = y.data_ptr<float>(), *rp = rstd.data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r) {
        const float* xr = xp + r * C;
        float ss = 0;
        for (int64_t i = 0; i < C; ++i) ss += xr[i] * xr[i];
        const float k = 1.0f / std::sqrt(ss / static_cast<float>(C) + static_cast<float>(eps));
        rp[r] = k;
        rms_norm_row(xr, wp, k, C, yp + r * C);
      }
    } else {
      rstd = at::rsqrt(x.to(at::kFloat).pow(2).mean(-1) + eps).reshape({rows});
      y = rms_norm_output(x, w, rstd);
    }
    ctx->save_for_backward({x, w, rstd});
    return y;
  }

  // The output again for a consumer's backward. q, k and v (gate and up) read the same norm output, so the
  // first rebuild is kept on this node until its own backward, which runs after all of theirs.
  static at::Tensor rebuild(torch::autograd::Node& node) {
    AutogradContext& ctx = static_cast<CppNode<RmsNormFn>&>(node).ctx_;
    auto it = ctx.saved_data.find(kRebuilt);
    if (it != ctx.saved_data.end()) return it->second.toTensor();
    const auto saved = ctx.get_saved_variables();
    at::Tensor y = rms_norm_output(saved[0], saved[1], saved[2]);
    ctx.saved_data[kRebuilt] = y;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    ctx->saved_data.erase(kRebuilt);
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &rstd = saved[2];
    at::Tensor dy = grads[0].contiguous();
    const int64_t C = x.size(-1), rows = rstd.size(0);
    const bool want_w = ctx->needs_input_grad(1);
    at::Tensor dx, dw;
    if (cpu_float(x) && cpu_float(w) && cpu_float(dy)) {
      dx = at::empty_like(x);
      std::vector<float> acc(want_w ? static_cast<size_t>(C) : 0, 0.0f);
      const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *gp = dy.data_ptr<float>(),
                  *rp = rstd.data_ptr<float>();
      float* dp = dx.data_ptr<float>();
      for (int64_t r = 0; r < rows; ++r) {
        const float *xr = xp + r * C, *gr = gp + r * C;
        const float k = rp[r];
        float s = 0;  // sum_i dy_i w_i x_i
        for (int64_t i = 0; i < C; ++i) s += gr[i] * wp[i] * xr[i];
        // dx = k (dy w) - x k^3 s / C   (the gradient of w x k through k = (mean x^2 + eps)^-1/2)
        const float c = k * k * k * s / static_cast<float>(C);
        float* dr = dp + r * C;
        for (int64_t i = 0; i < C; ++i) dr[i] = k * gr[i] * wp[i] - xr[i] * c;
        if (want_w)
          for (int64_t i = 0; i < C; ++i) acc[static_cast<size_t>(i)] += gr[i] * xr[i] * k;
      }
      if (want_w) dw = at::from_blob(acc.data(), {C}, w.options()).clone();
    } else {
      std::vector<int64_t> row_shape = x.sizes().vec();
      row_shape.back() = 1;
      at::Tensor xf = x.to(at::kFloat), k = rstd.view(row_shape);  // (..., 1)
      at::Tensor xhat = xf * k;
      if (want_w) dw = (dy * xhat.to(dy.scalar_type())).reshape({-1, C}).sum(0).to(w.scalar_type());
      at::Tensor g = (dy * w).to(at::kFloat);
      dx = (k * (g - xhat * (g * xhat).mean(-1, /*keepdim=*/true))).to(x.scalar_type());
    }
    return {dx, dw, at::Tensor()};
  }
};

// ---- Rotary embeddings -------------------------------------------------------------------------------

// y = x c + rot(x) s with rot(x) = (-x2, x1) over the halves of D. Its adjoint (the backward) is
// dx = dy c + rot^T(dy s) with rot^T(v) = (v2, -v1): the same loop with the rotation's sign flipped.
// x and y are walked with their own strides (unit stride on D); c and s are (B, 1, T, D) contiguous.
void rope_loop(const at::Tensor& x, const at::Tensor& c, const at::Tensor& s, at::Tensor& y, bool adjoint) {
  const int64_t B = x.size(0), H = x.size(1), T = x.size(2), D = x.size(3), half = D / 2;
  const float *xp = x.data_ptr<float>(), *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const float* xr = xp + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
        float* yr = yp + b * y.stride(0) + h * y.stride(1) + t * y.stride(2);
        const float *cr = cp + (b * T + t) * D, *sr = sp + (b * T + t) * D;
        if (!adjoint) {
          for (int64_t i = 0; i < half; ++i) yr[i] = xr[i] * cr[i] + (-xr[i + half]) * sr[i];
          for (int64_t i = half; i < D; ++i) yr[i] = xr[i] * cr[i] + xr[i - half] * sr[i];
        } else {
          for (int64_t i = 0; i < half; ++i) yr[i] = xr[i] * cr[i] + xr[i + half] * sr[i + half];
          for (int64_t i = half; i < D; ++i) yr[i] = xr[i] * cr[i] - xr[i - half] * sr[i - half];
        }
      }
}

struct RopeFn : torch::autograd::Function<RopeFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& c,
                            const at::Tensor& s) {
    at::Tensor y = at::empty(x.sizes(), x.options());  // contiguous (B, H, T, D)
    rope_loop(x, c, s, y, false);
    ctx->save_for_backward({c, s});
    ctx->saved_data["x_strides"] = x.is_non_overlapping_and_dense() ? x.strides().vec() : y.strides().vec();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor dy = grads[0];
    if (dy.stride(-1) != 1) dy = dy.contiguous();
    // Laid out as x was (the transposed view of a projection): the view's backward then needs no copy.
    at::Tensor dx = at::empty_strided(dy.sizes(), ctx->saved_data["x_strides"].toIntVector(), dy.options());
    rope_loop(dy, saved[0], saved[1], dx, true);
    return {dx, at::Tensor(), at::Tensor()};
  }
};

// ---- SwiGLU -------------------------------------------------------------------------------------------

// silu(g) * u = g s u from s = sigmoid(g): the forward's output, and the same values again when the down
// projection's backward rebuilds it (core/rebuild.h).
at::Tensor swiglu_output(const at::Tensor& g, const at::Tensor& u, const at::Tensor& s) {
  if (!(cpu_float(g) && cpu_float(u) && cpu_float(s))) return g * s * u;
  at::Tensor y = at::empty_like(g);
  const float *gp = g.data_ptr<float>(), *up = u.data_ptr<float>(), *sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t n = g.numel();
  for (int64_t i = 0; i < n; ++i) yp[i] = gp[i] * sp[i] * up[i];
  return y;
}

constexpr const char* kSigmoid = "sigmoid";  // sigmoid(gate), made by a rebuild for SwiGLU's own backward

struct SwigluFn : torch::autograd::Function<SwigluFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    ctx->save_for_backward({gate, up});
    return swiglu_output(gate, up, at::sigmoid(gate));
  }

  // The output again, for the down projection's backward. sigmoid(gate) is the costly part (an exp per
  // element, 0.5 ms at 1024 x 1024); SwiGLU's own backward, which runs next, needs it too, so it is kept on
  // this node until then.
  static at::Tensor rebuild(torch::autograd::Node& node) {
    AutogradContext& ctx = static_cast<CppNode<SwigluFn>&>(node).ctx_;
    const auto saved = ctx.get_saved_variables();
    at::Tensor s = at::sigmoid(saved[0]);
    ctx.saved_data[kSigmoid] = s;
    return swiglu_output(saved[0], saved[1], s);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &g = saved[0], &u = saved[1];
    at::Tensor s;  // sigmoid(g): silu(g) = g s, silu'(g) = s (1 + g (1 - s))
    if (auto it = ctx->saved_data.find(kSigmoid); it != ctx->saved_data.end()) {
      s = it->second.toTensor();
      ctx->saved_data.erase(it);
    } else {
      s = at::sigmoid(g);
    }
    at::Tensor dy = grads[0].contiguous();
    if (cpu_float(g) && cpu_float(u) && cpu_float(dy) && cpu_float(s)) {
      // du takes s's memory, each element read before it is overwritten: no third (..., I) tensor while
      // gate and up are still held (the top of backward's memory peak).
      at::Tensor dg = at::empty_like(g), du = s;
      const float *gp = g.data_ptr<float>(), *up = u.data_ptr<float>(), *yp = dy.data_ptr<float>();
      float *dgp = dg.data_ptr<float>(), *dup = du.data_ptr<float>();
      const int64_t n = g.numel();
      for (int64_t i = 0; i < n; ++i) {
        const float si = dup[i], gs = gp[i] * si;
        dup[i] = yp[i] * gs;
        dgp[i] = yp[i] * up[i] * (si + gs * (1.0f - si));
      }
      return {dg, du};
    }
    return {dy * u * s * (1 + g * (1 - s)), dy * g * s};
  }
};

// ---- Attention ----------------------------------------------------------------------------------------

// softmax(scale q k^T + bias) over S for every query head, as (B Hkv, G T, S) in q's dtype (the softmax in
// float32): the forward's probabilities, and the same values again in backward. The G query heads of a
// key/value head are stacked along T (q is (B, H, T, D) with head h reading key/value head h / G), so
// keys are never repeated and each product is one GEMM per (example, key/value head): measured on the
// small Llama (6 heads on 2) 9.1 ms forward and backward per layer against 11.5 with repeated keys and 48
// smaller GEMMs. `mm` is the products' dtype: undefined in the forward pass, where autocast (if on)
// chooses it and it is reported back; backward passes it in, so that its products are the forward's
// whatever autocast's state then. `probs32` gets the float32 probabilities.
at::Tensor attention_probs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& bias,
                           at::ScalarType& mm, at::Tensor* probs32) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  const int64_t G = H / Hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const bool given = mm != at::ScalarType::Undefined;
  at::Tensor scores = at::bmm((given ? q.to(mm) : q).reshape({B * Hkv, G * T, D}),
                              (given ? k.to(mm) : k).reshape({B * Hkv, S, D}).transpose(1, 2))
                          .view({B, Hkv, G, T, S});
  mm = scores.scalar_type();
  if (bias.defined())  // bias + scale (q k^T), one pass
    scores = at::add(bias.reshape({bias.size(0), bias.size(1) == 1 ? 1 : Hkv, bias.size(1) == 1 ? 1 : G,
                                   bias.size(2), bias.size(3)}),
                     scores, scale);
  else
    scores = scores * scale;
  at::Tensor p = at::softmax(scores, -1, at::kFloat);  // (B, Hkv, G, T, S)
  if (probs32) *probs32 = p.view({B * Hkv, G * T, S});
  return p.to(q.scalar_type()).view({B * Hkv, G * T, S});
}

// The attention as one node that keeps q, k, v and the bias, not the probabilities (B, H, T, S): backward
// computes them again (one GEMM and a softmax) before the usual products. On the small Llama at batch 8 x
// 128 the probabilities are 3 of 25 MiB of activations per layer; computing them again costs ~1.3 ms per
// layer, forward and backward together ~6.
struct AttentionFn : torch::autograd::Function<AttentionFn> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const c10::optional<at::Tensor>& bias) {
    const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
    ctx->save_for_backward({q, k, v, b});
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
    at::ScalarType mm = at::ScalarType::Undefined;
    const at::Tensor p = attention_probs(q, k, b, mm, nullptr);
    ctx->saved_data["mm"] = mm;
    return at::bmm(p, v.reshape({B * Hkv, S, D})).view({B, H, T, D});
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Every product in the forward pass's dtype, explicitly: autograd may run this with autocast off.
    c10::impl::ExcludeDispatchKeyGuard no_autocast(
        c10::DispatchKeySet({c10::DispatchKey::AutocastCPU, c10::DispatchKey::AutocastCUDA}));
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &b = saved[3];
    const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
    const int64_t G = H / Hkv;
    at::ScalarType mm = ctx->saved_data["mm"].toScalarType();
    at::Tensor p32;
    const at::Tensor p = attention_probs(q, k, b, mm, &p32).to(mm);        // (B Hkv, G T, S)
    const at::Tensor dout = grads[0].to(mm).reshape({B * Hkv, G * T, D});  // (B Hkv, G T, D)
    at::Tensor dq, dk, dv;
    if (ctx->needs_input_grad(2))
      dv = at::bmm(p.transpose(1, 2), dout).view(v.sizes()).to(v.scalar_type());  // (B, Hkv, S, D)
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1)) {
      at::Tensor dp = at::bmm(dout, v.to(mm).reshape({B * Hkv, S, D}).transpose(1, 2));  // (B Hkv, G T, S)
      // Through the softmax (float32, as the forward took it), then the scale of q k^T.
      at::Tensor ds = at::_softmax_backward_data(dp.to(at::kFloat), p32, -1, at::kFloat)
                          .mul_(1.0 / std::sqrt(static_cast<double>(D)))
                          .to(mm);
      if (ctx->needs_input_grad(0))
        dq = at::bmm(ds, k.to(mm).reshape({B * Hkv, S, D})).view(q.sizes()).to(q.scalar_type());
      if (ctx->needs_input_grad(1))
        dk = at::bmm(ds.transpose(1, 2), q.to(mm).reshape({B * Hkv, G * T, D}))
                 .view(k.sizes())
                 .to(k.scalar_type());
    }
    return {dq, dk, dv, at::Tensor()};
  }
};

// ---- Linear + cross-entropy ---------------------------------------------------------------------------

struct LinearCrossEntropyFn : torch::autograd::Function<LinearCrossEntropyFn> {
  // grads: dL/dhidden, dL/dweight, dL/dbias from the forward pass (undefined where not wanted). Passed as a
  // vector, which autograd does not treat as inputs; so is an absent bias (libtorch 1.13 refuses undefined
  // tensors as inputs).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, const at::Tensor& loss,
                            const std::vector<at::Tensor>& grads) {
    ctx->saved_data["dh"] = grads[0];
    ctx->saved_data["dw"] = grads[1];
    ctx->saved_data["db"] = grads[2];
    return loss.clone();
  }

  static variable_list backward(AutogradContext* ctx, variable_list out_grads) {
    const at::Tensor g = out_grads[0];  // 0-dim
    auto scaled = [&](const char* key) {
      at::Tensor t = ctx->saved_data[key].toTensor();
      return t.defined() ? t * g.to(t.scalar_type()) : t;
    };
    return {scaled("dh"), scaled("dw"), scaled("db"), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor rms_norm_fused(const at::Tensor& x, const at::Tensor& w, double eps) {
  MDL_CHECK(x.size(-1) == w.numel(), "[rms_norm] input has ", x.size(-1), " features, the weight ",
            w.numel());
  static const bool registered = (register_rebuild(typeid(CppNode<RmsNormFn>), &RmsNormFn::rebuild), true);
  (void)registered;
  return RmsNormFn::apply(x, w, eps);
}

bool rope_fusable(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  return x.dim() == 4 && x.device().is_cpu() && x.scalar_type() == at::kFloat && x.stride(3) == 1 &&
         x.size(3) % 2 == 0 && cpu_float(cos) && cpu_float(sin) && cos.dim() == 4 &&
         cos.size(0) == x.size(0) && cos.size(1) == 1 && cos.size(2) == x.size(2) &&
         cos.size(3) == x.size(3) && sin.sizes() == cos.sizes();
}

at::Tensor rope_fused(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  MDL_CHECK(rope_fusable(x, cos, sin),
            "[rope] fused rotary embeddings need float32 CPU x (B, H, T, D) with unit "
            "stride on D and tables (B, 1, T, D); got x ",
            x.sizes(), " and tables ", cos.sizes());
  return RopeFn::apply(x, cos, sin);
}

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) {
  MDL_CHECK(gate.sizes() == up.sizes(), "[swiglu] gate ", gate.sizes(), " and up ", up.sizes(), " differ");
  static const bool registered = (register_rebuild(typeid(CppNode<SwigluFn>), &SwigluFn::rebuild), true);
  (void)registered;
  return SwigluFn::apply(gate, up);
}

at::Tensor attention_recomputed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& bias) {
  const bool wants_grad =
      at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad());
  if (wants_grad && !(bias.defined() && bias.requires_grad()))
    return AttentionFn::apply(q, k, v, bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt);
  // No node (or a bias that learns: autograd through the same ops); the same values as the node's forward.
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  at::ScalarType mm = at::ScalarType::Undefined;
  return at::bmm(attention_probs(q, k, bias, mm, nullptr), v.reshape({B * Hkv, S, D})).view({B, H, T, D});
}

at::Tensor linear_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                                const at::Tensor& targets, int64_t ignore_index, int64_t chunk_rows) {
  MDL_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
            "[lm_loss] hidden (N, C) = ", hidden.sizes(), " and weight (V, C) = ", weight.sizes(),
            " do not fit");
  MDL_CHECK(targets.dim() == 1 && targets.size(0) == hidden.size(0), "[lm_loss] targets must be (N) = (",
            hidden.size(0), "), got ", targets.sizes());
  const int64_t N = hidden.size(0), V = weight.size(0);
  at::Tensor t = targets.to(hidden.device(), at::kLong);
  const at::Tensor valid = t != ignore_index;      // (N)
  const at::Tensor safe = at::where(valid, t, 0);  // (N) ignored rows read class 0, then count for nothing
  if (N > 0) {
    const int64_t lo = safe.min().item<int64_t>(), hi = safe.max().item<int64_t>();
    MDL_CHECK(lo >= 0 && hi < V, "[lm_loss] targets must be in [0, ", V, ") or ", ignore_index, ", found ",
              lo < 0 ? lo : hi);
  }
  const bool on = at::GradMode::is_enabled();
  const bool want_h = on && hidden.requires_grad(), want_w = on && weight.requires_grad(),
             want_b = on && bias.defined() && bias.requires_grad(), grad = want_h || want_w || want_b;
  if (chunk_rows <= 0)
    // 4 MiB of logits: a chunk's logits and log-softmax are the top of a training step's memory (at the
    // end of the forward pass, over every activation); 8 MiB chunks made that peak 8 MiB higher for no
    // measurable speed (small Llama: 128 rows x 8192 classes, 8 chunks per batch).
    chunk_rows = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(V, 1));

  at::NoGradGuard no_grad;  // everything below is computed by hand, in float32 even under autocast
  c10::impl::ExcludeDispatchKeyGuard no_autocast(
      c10::DispatchKeySet({c10::DispatchKey::AutocastCPU, c10::DispatchKey::AutocastCUDA}));
  const at::Tensor h = hidden.detach().to(at::kFloat), w = weight.detach().to(at::kFloat);
  const at::Tensor b = bias.defined() ? bias.detach().to(at::kFloat) : at::Tensor();
  const at::Tensor validf = valid.to(at::kFloat);
  const bool all_valid = N == 0 || valid.all().item<bool>();  // no ignored row to zero in the gradient
  at::Tensor loss = at::zeros({}, h.options());
  at::Tensor dh = want_h ? at::empty_like(h) : at::Tensor();
  at::Tensor dw = want_w ? at::zeros_like(w) : at::Tensor();
  at::Tensor db = want_b ? at::zeros_like(b) : at::Tensor();
  for (int64_t r0 = 0; r0 < N; r0 += chunk_rows) {
    const int64_t n = std::min(chunk_rows, N - r0);
    at::Tensor hc = h.narrow(0, r0, n);                                             // (n, C)
    at::Tensor logits = b.defined() ? at::addmm(b, hc, w.t()) : at::mm(hc, w.t());  // (n, V)
    // One fused row-wise kernel (max, sum of exponentials, shift) where logsumexp and a subtraction took
    // five passes over the chunk.
    at::Tensor lsm = at::_log_softmax(logits, 1, false);  // (n, V)
    logits = at::Tensor();
    at::Tensor tc = safe.narrow(0, r0, n).unsqueeze(1), vc = validf.narrow(0, r0, n);
    loss.sub_((lsm.gather(1, tc).squeeze(1) * vc).sum());
    if (!grad) continue;
    // dL/dlogits = softmax - onehot(target), zero on ignored rows (scaled by 1 / count at the end)
    at::Tensor p = lsm.exp_();
    p.scatter_add_(1, tc, -vc.unsqueeze(1));
    if (!all_valid) p.mul_(vc.unsqueeze(1));
    if (want_h) {
      at::Tensor dhc = dh.narrow(0, r0, n);
      at::mm_out(dhc, p, w);
    }
    if (want_w) dw.addmm_(p.t(), hc);
    if (want_b) db.add_(p.sum(0));
  }
  const at::Tensor count = validf.sum();
  loss.div_(count);
  if (!grad) return loss;
  auto finish = [&](at::Tensor d, const at::Tensor& like) {
    return d.defined() ? d.div_(count).to(like.scalar_type()) : d;
  };
  dh = finish(dh, hidden), dw = finish(dw, weight), db = finish(db, bias);  // undefined stays undefined
  at::AutoGradMode enable(true);
  const c10::optional<at::Tensor> maybe_bias =
      bias.defined() ? c10::optional<at::Tensor>(bias) : c10::nullopt;
  return LinearCrossEntropyFn::apply(hidden, weight, maybe_bias, loss, std::vector<at::Tensor>{dh, dw, db});
}

}  // namespace mdl::fn
