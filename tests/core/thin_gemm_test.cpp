#include "mdl/core/thin_gemm.h"

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include <thread>

#include "test_util.h"

namespace mdl {
namespace {

// Max abs difference relative to the reference's largest magnitude.
double rel_diff(const at::Tensor& got, const at::Tensor& want) {
  return (got - want).abs().max().item<double>() / std::max(1e-12, want.abs().max().item<double>());
}

TEST(ThinGemm, BuildUsesOneDnnWhereCMakeFoundIt) {
  EXPECT_EQ(thin_gemm_accelerated(), MDL_EXPECT_ONEDNN != 0);
}

// The tensor forms reach the backend for LoRA's shapes, counted where the backend is called (whether its
// bits differ from at::mm's depends on the CPU's kernels: on some they are equal). Products the
// backend must not take (past the small-dimension limit, needing a gradient, float64) are not counted.
TEST(ThinGemm, LoraShapesGoToTheBackend) {
  if (!thin_gemm_accelerated()) GTEST_SKIP() << "built without oneDNN: every product is at::'s";
  at::manual_seed(3);
  const at::Tensor x = at::randn({1024, 384}), A = at::randn({16, 384});  // x A^T: (1024, 16)
  at::Tensor raw = at::empty({1024, 16});
  uint64_t before = thin_gemm_backend_calls();
  thin_sgemm('N', 'T', 1024, 16, 384, 1.0f, x.data_ptr<float>(), 384, A.data_ptr<float>(), 384, 0.0f,
             raw.data_ptr<float>(), 16);
  EXPECT_EQ(thin_gemm_backend_calls() - before, 1u);
  const at::Tensor c = at::randn({1024, 16});
  at::Tensor d = c.clone();
  before = thin_gemm_backend_calls();
  const at::Tensor got = thin_mm(x, A.t());
  const at::Tensor sum = thin_addmm(c, x, A.t(), 0.5);
  thin_addmm_(d, x, A.t(), 0.5);
  EXPECT_EQ(thin_gemm_backend_calls() - before, 3u)
      << "thin_mm, thin_addmm and thin_addmm_ each call it once";
  EXPECT_TRUE(got.equal(raw)) << "the tensor form is the raw form";
  EXPECT_LT(rel_diff(got, at::mm(x, A.t())), 1e-5);
  EXPECT_LT(rel_diff(sum, c + 0.5 * raw), 1e-5);
  EXPECT_LT(rel_diff(d, c + 0.5 * raw), 1e-5);

  before = thin_gemm_backend_calls();
  thin_mm(at::randn({128, 96}), at::randn({96, 80}));  // smallest dimension 80 > 64: an ordinary GEMM
  thin_mm(x.to(at::kDouble), A.t().to(at::kDouble));
  thin_mm(x.clone().requires_grad_(), A.t());
  EXPECT_EQ(thin_gemm_backend_calls(), before) << "these take at::";
}

TEST(ThinGemm, EqualsAtMmForEveryLayoutOfBothOperands) {
  at::manual_seed(0);
  // (M, K, N): LoRA's shapes (r = 16 rows, columns or inner dimension), odd sizes, and one past the
  // small-dimension limit (at:: then).
  const std::vector<std::array<int64_t, 3>> shapes = {{16, 1024, 384}, {1024, 384, 16}, {1024, 16, 384},
                                                      {7, 33, 129},    {130, 3, 65},    {96, 200, 128}};
  for (const auto& [m, k, n] : shapes) {
    for (bool ta : {false, true}) {
      for (bool tb : {false, true}) {
        at::Tensor a = ta ? at::randn({k, m}).t() : at::randn({m, k});  // (M, K), a transposed view or not
        at::Tensor b = tb ? at::randn({n, k}).t() : at::randn({k, n});  // (K, N)
        const at::Tensor want = at::mm(a, b);
        SCOPED_TRACE(testing::Message() << m << "x" << k << "x" << n << " ta " << ta << " tb " << tb);
        at::Tensor got = thin_mm(a, b);
        EXPECT_TRUE(got.is_contiguous());
        EXPECT_LT(rel_diff(got, want), 1e-5);
        EXPECT_LT(rel_diff(thin_mm(a, b, -0.5), want * -0.5), 1e-5);
        const at::Tensor c = at::randn({m, n});
        EXPECT_LT(rel_diff(thin_addmm(c, a, b, 2.0), c + 2.0 * want), 1e-5);
        at::Tensor d = c.clone();
        thin_addmm_(d, a, b, 0.25);
        EXPECT_LT(rel_diff(d, c + 0.25 * want), 1e-5);
      }
    }
  }
}

TEST(ThinGemm, RawFormTakesRowMajorPointersInBothOrientations) {
  at::manual_seed(2);
  const int64_t m = 20, k = 16, n = 50;
  for (char ta : {'N', 'T'}) {
    for (char tb : {'N', 'T'}) {
      const at::Tensor a = ta == 'N' ? at::randn({m, k}) : at::randn({k, m});  // stored as given
      const at::Tensor b = tb == 'N' ? at::randn({k, n}) : at::randn({n, k});
      at::Tensor c = at::randn({m, n});
      const at::Tensor want = 0.5 * c + 3.0 * at::mm(ta == 'N' ? a : a.t(), tb == 'N' ? b : b.t());
      thin_sgemm(ta, tb, m, n, k, 3.0f, a.data_ptr<float>(), a.size(1), b.data_ptr<float>(), b.size(1), 0.5f,
                 c.data_ptr<float>(), n);
      EXPECT_LT(rel_diff(c, want), 1e-5) << ta << tb;
    }
  }
  float x = 0;
  EXPECT_THROW_WITH(thin_sgemm('C', 'N', 1, 1, 1, 1.0f, &x, 1, &x, 1, 0.0f, &x, 1),
                    "[thin_sgemm] trans must be 'N' or 'T', got 'C' and 'N'");
}

TEST(ThinGemm, StridedAndNonFloatOperandsTakeTheReferencePath) {
  at::manual_seed(1);
  // Every other column: neither row- nor column-major, copied before the product.
  at::Tensor a = at::randn({16, 200}).slice(1, 0, 200, 2);  // (16, 100)
  at::Tensor b = at::randn({100, 64});
  EXPECT_LT(rel_diff(thin_mm(a, b), at::mm(a, b)), 1e-5);
  // float64: at::, exactly.
  at::Tensor a64 = at::randn({16, 50}, at::kDouble), b64 = at::randn({50, 30}, at::kDouble);
  EXPECT_TRUE(thin_mm(a64, b64, 3.0).equal(at::mm(a64, b64).mul_(3.0)));
  // In place on a non-contiguous c (a transposed view): at::'s addmm_, and the view's storage changes.
  at::Tensor storage = at::randn({64, 16});
  at::Tensor c = storage.t();  // (16, 64)
  const at::Tensor before = c.clone();
  thin_addmm_(c, a, b, 1.0);
  EXPECT_LT(rel_diff(storage.t(), before + at::mm(a, b)), 1e-5);
}

TEST(ThinGemm, WorksFromAThreadTorchDidNotStart) {
  at::Tensor a = at::randn({16, 300}), b = at::randn({300, 200});
  at::Tensor got;
  std::thread([&] { got = thin_mm(a, b); }).join();
  EXPECT_LT(rel_diff(got, at::mm(a, b)), 1e-5);
}

TEST(ThinGemm, GradientsFlowWhenOperandsRequireThem) {
  at::Tensor a = at::randn({16, 40}).requires_grad_(), b = at::randn({40, 24}).requires_grad_();
  thin_mm(a, b, 2.0).sum().backward();
  ASSERT_TRUE(a.grad().defined() && b.grad().defined());
  EXPECT_LT(rel_diff(a.grad(), 2.0 * at::ones({16, 24}).mm(b.detach().t())), 1e-5);
}

TEST(ThinGemm, AutocastKeepsItsLowerPrecision) {
  at::Tensor a = at::randn({16, 64}), b = at::randn({64, 32});
  at::autocast::set_cpu_enabled(true);
  at::Tensor got = thin_mm(a, b);
  at::autocast::set_cpu_enabled(false);
  EXPECT_EQ(got.scalar_type(), at::kBFloat16);
}

TEST(ThinGemm, RefusesMismatchedShapesNamingThem) {
  at::Tensor a = at::randn({16, 40}), b = at::randn({41, 8});
  EXPECT_THROW_WITH(thin_mm(a, b), "[thin_mm] expected a (M, K) and b (K, N), got [16, 40] and [41, 8]");
  at::Tensor c = at::randn({16, 9});
  EXPECT_THROW_WITH(thin_addmm(c, a, at::randn({40, 8}), 1.0), "[thin_addmm] c must be [16, 8], got [16, 9]");
  EXPECT_THROW_WITH(thin_addmm_(c, a, at::randn({40, 8}), 1.0),
                    "[thin_addmm_] c must be [16, 8], got [16, 9]");
}

}  // namespace
}  // namespace mdl
