#include "mdl/modules/lora_bank.h"

#include <ATen/ATen.h>
#include <c10/util/Half.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <vector>

#include "mdl/core/error.h"
#include "mdl/core/thin_gemm.h"

namespace mdl {

void LoraBank::update(const std::vector<Factors>& loras, at::ScalarType storage) {
  std::vector<const void*> ids;
  std::vector<int64_t> versions;
  for (const auto& f : loras) {
    ids.push_back(f.A.data_ptr()), ids.push_back(f.B.data_ptr());
    versions.push_back(static_cast<int64_t>(f.A._version())),
        versions.push_back(static_cast<int64_t>(f.B._version()));
  }
  MDL_CHECK(storage == at::kFloat || storage == at::kHalf,
            "[lora_bank] storage must be float32 or float16, got ", c10::toString(storage));
  if (at_.defined() && ids == ids_ && versions == versions_ && storage == storage_) return;
  MDL_CHECK(!loras.empty(), "[lora_bank] nothing to stack");
  int64_t r_max = 0;
  for (const auto& f : loras) r_max = std::max(r_max, f.A.size(0));
  if (storage == at::kHalf) r_max = (r_max + 7) / 8 * 8;  // whole 8-float vectors in the CPU kernel
  const int64_t in = loras[0].A.size(1), out = loras[0].B.size(0), n = static_cast<int64_t>(loras.size());
  at::Tensor a_t = at::zeros({n + 1, in, r_max}, loras[0].A.options().requires_grad(false));
  at::Tensor b_t = at::zeros({n + 1, r_max, out}, loras[0].B.options().requires_grad(false));
  std::vector<double> scaling(static_cast<size_t>(n + 1), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    const Factors& f = loras[static_cast<size_t>(i)];
    MDL_CHECK(f.A.size(1) == in && f.B.size(0) == out, "[lora_bank] LoRA ", i, " is (", f.B.size(0), " x ",
              f.A.size(1), "), the site is (", out, " x ", in, ")");
    const int64_t r = f.A.size(0);
    a_t[i].narrow(1, 0, r).copy_(f.A.detach().t());
    b_t[i].narrow(0, 0, r).copy_(f.B.detach().t());
    scaling[static_cast<size_t>(i)] = f.scaling;
  }
  if (storage != a_t.scalar_type()) a_t = a_t.to(storage), b_t = b_t.to(storage);
  at_ = a_t, bt_ = b_t, scaling_ = std::move(scaling), n_ = n, storage_ = storage, ids_ = std::move(ids),
  versions_ = std::move(versions);
}

namespace {

/// One decoding row: y += s * B (A x), with At = A^T (in, r) and Bt = B^T (r, out), as two runs of
/// multiply-adds over contiguous memory (vectorised; an AVX2 + FMA clone is picked at load time where the
/// CPU has it). h: r floats of scratch.
#if defined(__x86_64__)
__attribute__((target_clones("arch=haswell", "default")))
#endif
void lora_row(const float* __restrict x, const float* __restrict At, const float* __restrict Bt, float* __restrict h,
              float* __restrict y, int in, int r, int out, float s) {
  for (int k = 0; k < r; ++k) h[k] = 0.0f;
  for (int i = 0; i < in; ++i) {
    const float xi = x[i];
    const float* a = At + static_cast<int64_t>(i) * r;
    for (int k = 0; k < r; ++k) h[k] += xi * a[k];
  }
  for (int k = 0; k < r; ++k) {
    const float hk = s * h[k];
    const float* b = Bt + static_cast<int64_t>(k) * out;
    for (int o = 0; o < out; ++o) y[o] += hk * b[o];
  }
}

#if defined(__x86_64__)
__attribute__((target("avx2,f16c"))) inline __m256 load_half8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

/// lora_row with float16 factors (r a multiple of 8), converted to float32 as they are read. AVX2 + FMA +
/// F16C where the CPU has them (every x86-64 since 2013), else a portable loop.
__attribute__((target("avx2,fma,f16c"))) void lora_row_f16_avx2(const float* __restrict x,
                                                                const uint16_t* __restrict At,
                                                                const uint16_t* __restrict Bt,
                                                                float* __restrict h, float* __restrict y,
                                                                int in, int r, int out, float s) {
  // h = A x, up to 32 ranks at a time in registers (a running sum kept in memory would make every
  // step wait for the previous one's store).
  for (int k0 = 0; k0 < r; k0 += 32) {
    const int nv = std::min(4, (r - k0) / 8);
    __m256 h0 = _mm256_setzero_ps(), h1 = h0, h2 = h0, h3 = h0;
    const uint16_t* a = At + k0;
    for (int i = 0; i < in; ++i, a += r) {
      const __m256 xi = _mm256_set1_ps(x[i]);
      h0 = _mm256_fmadd_ps(xi, load_half8(a + 0), h0);
      if (nv > 1) h1 = _mm256_fmadd_ps(xi, load_half8(a + 8), h1);
      if (nv > 2) h2 = _mm256_fmadd_ps(xi, load_half8(a + 16), h2);
      if (nv > 3) h3 = _mm256_fmadd_ps(xi, load_half8(a + 24), h3);
    }
    _mm256_storeu_ps(h + k0, h0);
    if (nv > 1) _mm256_storeu_ps(h + k0 + 8, h1);
    if (nv > 2) _mm256_storeu_ps(h + k0 + 16, h2);
    if (nv > 3) _mm256_storeu_ps(h + k0 + 24, h3);
  }
  for (int k = 0; k < r; ++k) {
    const float hk = s * h[k];
    const __m256 hv = _mm256_set1_ps(hk);
    const uint16_t* b = Bt + static_cast<int64_t>(k) * out;
    int o = 0;
    for (; o + 8 <= out; o += 8)
      _mm256_storeu_ps(y + o, _mm256_fmadd_ps(hv, load_half8(b + o), _mm256_loadu_ps(y + o)));
    for (; o < out; ++o) y[o] += hk * _cvtsh_ss(b[o]);
  }
}

#endif

void lora_row_f16_portable(const float* x, const uint16_t* At, const uint16_t* Bt, float* h, float* y, int in,
                           int r, int out, float s) {
  auto f = [](uint16_t v) { return static_cast<float>(c10::Half(v, c10::Half::from_bits())); };
  for (int k = 0; k < r; ++k) h[k] = 0.0f;
  for (int i = 0; i < in; ++i)
    for (int k = 0; k < r; ++k) h[k] += x[i] * f(At[static_cast<int64_t>(i) * r + k]);
  for (int k = 0; k < r; ++k)
    for (int o = 0; o < out; ++o) y[o] += s * h[k] * f(Bt[static_cast<int64_t>(k) * out + o]);
}

using RowF16 = void (*)(const float*, const uint16_t*, const uint16_t*, float*, float*, int, int, int, float);

RowF16 pick_row_f16() {
#if defined(__x86_64__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return &lora_row_f16_avx2;
#endif
  return &lora_row_f16_portable;
}

/// CPU float32: each row's two small products read its LoRA straight from the bank. A gather copies
/// r x (in + out) floats per row and site and cost a 32-LoRA decoding step more than the base projection
/// itself (497 us vs 229 us at 512 x 512, batch 32). Decoding steps (one position per row) run lora_row,
/// on one thread: a second one, woken per site, made a 32-LoRA step slower (its wake-up and OpenBLAS's
/// spinning threads cost more than the 30-100 us it saved). Longer rows (prompts) take two thin products per
/// row (core/thin_gemm).
at::Tensor apply_cpu(const at::Tensor& x, const at::Tensor& current, const at::Tensor& a_t,
                     const at::Tensor& b_t, const std::vector<double>& scaling, const at::Tensor& idx,
                     const at::Tensor& scale, int64_t none) {
  const int rows = static_cast<int>(x.size(0)), in = static_cast<int>(a_t.size(1)),
            r = static_cast<int>(a_t.size(2)), out = static_cast<int>(b_t.size(2));
  const at::Tensor xs = x.reshape({rows, -1, in}).contiguous();  // (B, T, in)
  const int T = static_cast<int>(xs.size(1));
  at::Tensor result = current.reshape({rows, T, out}).clone(at::MemoryFormat::Contiguous);  // (B, T, out)
  const at::Tensor idx_cpu = idx.to(at::kLong).contiguous(), scale_cpu = scale.to(at::kDouble).contiguous();
  const int64_t* ip = idx_cpu.data_ptr<int64_t>();
  const double* sp = scale_cpu.data_ptr<double>();
  const bool half = a_t.scalar_type() == at::kHalf;
  const void* A0 = a_t.data_ptr();
  const void* B0 = b_t.data_ptr();
  const float* X0 = xs.data_ptr<float>();
  float* Y0 = result.data_ptr<float>();
  if (T == 1) {
    static const RowF16 row_f16 = pick_row_f16();
    std::vector<float> h(static_cast<size_t>(r));
    for (int64_t row = 0; row < rows; ++row) {
      if (ip[row] == none || sp[row] == 0.0) continue;
      const int64_t a = ip[row] * in * r, b = ip[row] * r * out;
      const float s = static_cast<float>(sp[row] * scaling[static_cast<size_t>(ip[row])]);
      if (half)
        row_f16(X0 + row * in, static_cast<const uint16_t*>(A0) + a, static_cast<const uint16_t*>(B0) + b,
                h.data(), Y0 + row * out, in, r, out, s);
      else
        lora_row(X0 + row * in, static_cast<const float*>(A0) + a, static_cast<const float*>(B0) + b,
                 h.data(), Y0 + row * out, in, r, out, s);
    }
    return result.view(current.sizes());
  }
  at::Tensor h = at::empty({T, r}, xs.options());
  float* H = h.data_ptr<float>();
  for (int row = 0; row < rows; ++row) {
    if (ip[row] == none || sp[row] == 0.0) continue;
    at::Tensor a32, b32;  // float16 storage: this row's factors in float32 for sgemm
    if (half) a32 = a_t[ip[row]].to(at::kFloat), b32 = b_t[ip[row]].to(at::kFloat);
    const float* A =
        half ? a32.data_ptr<float>() : static_cast<const float*>(A0) + ip[row] * in * r;  // (in, r)
    const float* B =
        half ? b32.data_ptr<float>() : static_cast<const float*>(B0) + ip[row] * r * out;  // (r, out)
    const float* X = X0 + static_cast<int64_t>(row) * T * in;
    float* Y = Y0 + static_cast<int64_t>(row) * T * out;
    thin_sgemm('N', 'N', T, r, in, 1.0f, X, in, A, r, 0.0f, H, r);  // (T, r)
    thin_sgemm('N', 'N', T, out, r, static_cast<float>(sp[row] * scaling[static_cast<size_t>(ip[row])]), H, r,
               B, out, 1.0f, Y, out);  // (T, out) += s H B
  }
  return result.view(current.sizes());
}

}  // namespace

at::Tensor LoraBank::apply(const at::Tensor& x, const at::Tensor& current, const at::Tensor& idx,
                           const at::Tensor& scale) const {
  if (x.is_cpu() && x.scalar_type() == at::kFloat && current.scalar_type() == at::kFloat)
    return apply_cpu(x, current, at_, bt_, scaling_, idx, scale, n_);
  // Elsewhere (CUDA, half precision): gather each row's factors, then two batched products.
  const int64_t rows = x.size(0);
  at::Tensor x3 = x.reshape({rows, -1, x.size(-1)});  // (B, T, in)
  at::Tensor a = at_.index_select(0, idx);            // (B, in, r)
  at::Tensor b = bt_.index_select(0, idx);            // (B, r, out)
  at::Tensor h = at::bmm(x3.to(a.scalar_type()), a);  // (B, T, r)
  const at::Tensor scaling = at::tensor(scaling_, at::kDouble).to(idx.device()).index_select(0, idx);
  h = h * (scale.to(at::kDouble) * scaling).to(h.scalar_type()).view({-1, 1, 1});
  at::Tensor delta = at::bmm(h, b);  // (B, T, out)
  return current + delta.view(current.sizes()).to(current.scalar_type());
}

}  // namespace mdl
