// Recurrent world models (recurrent/): the truncated kernel against its formula; the batched per-module GRU
// against a loop of torch's GRUCell; S2RMs' no-input rule (a module with no view near it keeps its state
// exactly, while the others move); shapes for any V and any number of modules, padded views that change
// nothing, gradients that reach every parameter; RIMs' top-k and the monolithic GRU behind one interface.
#include "mdl/recurrent/world_model.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/nn/modules/rnn.h>
#include <torch/utils.h>

#include "mdl/ops/spatial_kernel.h"
#include "mdl/recurrent/module_gru.h"
#include "mdl/recurrent/s2rm.h"
#include "test_util.h"

namespace mdl {
namespace {

Views random_views(int64_t B, int64_t V, const WorldModelOptions& o, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  return {at::randn({B, V, o.feature_dim}, gen), at::rand({B, V, o.location_dim}, gen) * 2 - 1, {}};
}

TEST(SpatialKernel, GaussianTruncatedToExactZeros) {
  const at::Tensor a = at::tensor({0.0, 0.0, 1.0, 0.0, 3.0, 3.0}).view({3, 2});
  const at::Tensor b = at::tensor({0.0, 0.0, 0.5, 0.0}).view({2, 2});
  const at::Tensor k = fn::truncated_kernel(a, b, 0.5, 0.05);  // (3, 2)
  EXPECT_DOUBLE_EQ(k[0][0].item<double>(), 1.0);
  EXPECT_NEAR(k[0][1].item<double>(), std::exp(-0.25 / 0.5), 1e-7);
  EXPECT_NEAR(k[1][0].item<double>(), std::exp(-1.0 / 0.5), 1e-7);  // 0.135 >= 0.05: kept
  EXPECT_EQ(k[2][0].item<double>(), 0.0) << "exp(-36) is below epsilon: exactly zero";
  EXPECT_EQ(k[2][1].item<double>(), 0.0);
  // Leading axes broadcast: (M, d) against (B, N, d).
  EXPECT_EQ(fn::truncated_kernel(a, b.unsqueeze(0).expand({4, 2, 2}), 0.5, 0.05).sizes(),
            (std::vector<int64_t>{4, 3, 2}));
  EXPECT_THROW_WITH(fn::truncated_kernel(a, b, 0.0, 0.05), "bandwidth must be > 0");
  EXPECT_THROW_WITH(fn::truncated_kernel(a, at::zeros({2, 3}), 0.5, 0.05), "points of one space");
}

TEST(ModuleGru, EqualsALoopOfGruCells) {
  const int64_t M = 3, B = 5, in = 4, H = 6;
  ModuleGru cells(M, in, H, 7);
  auto gen = at::detail::createCPUGenerator(1);
  const at::Tensor x = at::randn({B, M, in}, gen), h = at::randn({B, M, H}, gen);
  const at::Tensor got = cells->forward(x, h);
  torch::NoGradGuard g;
  for (int64_t m = 0; m < M; ++m) {
    torch::nn::GRUCell cell(torch::nn::GRUCellOptions(in, H));
    cell->weight_ih.copy_(cells->weight_ih[m]);
    cell->weight_hh.copy_(cells->weight_hh[m]);
    cell->bias_ih.copy_(cells->bias_ih[m]);
    cell->bias_hh.copy_(cells->bias_hh[m]);
    EXPECT_CLOSE(got.select(1, m), cell->forward(x.select(1, m), h.select(1, m)), 1e-6) << "module " << m;
  }
  EXPECT_THROW_WITH(cells->forward(x, h.narrow(1, 0, 2)), "expects x (B, 3, 4) and h (B, 3, 6)");
}

TEST(S2rm, AModuleWithNoViewNearItKeepsItsStateExactly) {
  WorldModelOptions o;
  o.modules = 4;
  S2rm model(o);
  {
    torch::NoGradGuard g;
    // Locations encode into [-1, 1]^2 (tanh); module 0 sits far outside, the others near the middle.
    model->embeddings.copy_(at::tensor({5.0, 5.0, 0.1, 0.0, -0.2, 0.1, 0.0, -0.1}).view({4, 2}));
  }
  auto gen = at::detail::createCPUGenerator(3);
  const Views views = random_views(2, 3, o, 4);
  const at::Tensor h = at::randn({2, 4, o.hidden}, gen);
  StepTrace trace;
  const at::Tensor next = model->step(views, h, &trace);
  EXPECT_TRUE(at::equal(next.select(1, 0), h.select(1, 0))) << "no input, no update";
  for (int64_t m = 1; m < 4; ++m) EXPECT_CHANGED(next.select(1, m), h.select(1, m)) << "module " << m;
  EXPECT_EQ(trace.active.sizes(), (std::vector<int64_t>{2, 4}));
  EXPECT_FALSE(trace.active[0][0].item<bool>());
  EXPECT_TRUE(trace.active[0][1].item<bool>());
  EXPECT_EQ(trace.input_kernel.select(1, 0).abs().sum().item<double>(), 0.0);
  EXPECT_EQ(trace.input_attention.select(1, 0).abs().sum().item<double>(), 0.0);
  EXPECT_CLOSE(trace.input_attention.select(1, 1).sum(-1), at::ones({2}), 1e-6) << "attention sums to 1";
  EXPECT_EQ(trace.module_kernel[0][1].item<double>(), 0.0) << "far modules do not talk";
  EXPECT_EQ(trace.module_kernel[0][0].item<double>(), 1.0);
}

TEST(WorldModels, ShapesForAnyViewsAndModulesPaddingChangesNothingGradientsFlow) {
  for (const std::string kind : {"s2rm", "rims", "gru"})
    for (int64_t M : {1, 3, 7})
      for (int64_t V : {1, 2, 8}) {
        WorldModelOptions o;
        o.kind = kind;
        o.modules = M;
        o.top_k = std::min<int64_t>(2, M);
        auto model = make_world_model(o);
        const int64_t states = kind == "gru" ? 1 : M;
        const Views views = random_views(3, V, o, static_cast<uint64_t>(V + 10 * M));
        at::Tensor h = model->initial_state(3);
        ASSERT_EQ(h.sizes(), (std::vector<int64_t>{3, states, o.hidden})) << kind;
        StepTrace trace;
        h = model->step(views, h, &trace);
        h = model->step(views, h, &trace);
        EXPECT_EQ(h.sizes(), (std::vector<int64_t>{3, states, o.hidden})) << kind << " M " << M << " V " << V;
        auto gen = at::detail::createCPUGenerator(5);
        const at::Tensor queries = at::rand({3, 5, o.location_dim}, gen);
        const at::Tensor out = model->decode(h, queries);
        EXPECT_EQ(out.sizes(), (std::vector<int64_t>{3, 5, o.output_dim})) << kind;
        if (kind == "rims") EXPECT_EQ(trace.active.sum(-1).eq(o.top_k).all().item<bool>(), true);
        // A padded view (masked) changes nothing.
        Views padded = views;
        padded.features = at::cat({views.features, at::randn({3, 1, o.feature_dim}, gen) * 9}, 1);
        padded.locations = at::cat({views.locations, at::rand({3, 1, o.location_dim}, gen)}, 1);
        padded.mask = at::cat({at::ones({3, V}, at::kBool), at::zeros({3, 1}, at::kBool)}, 1);
        const at::Tensor h0 = model->initial_state(3);
        EXPECT_CLOSE(model->step(padded, h0), model->step(views, h0), 1e-6)
            << kind << " M " << M << " V " << V;
        if (M == 3 && V == 8) {  // gradients reach every parameter through two steps and the decoder
          model->zero_grad();
          out.pow(2).mean().backward();
          for (const auto& p : model->named_parameters())
            EXPECT_TRUE(p.value().grad().defined() && p.value().grad().abs().sum().item<double>() > 0)
                << kind << " " << p.key();
        }
      }
  WorldModelOptions bad;
  bad.kind = "lstm";
  EXPECT_THROW_WITH(make_world_model(bad), "kind 'lstm' is unknown; expected s2rm, rims or gru");
  WorldModelOptions o;
  auto model = make_world_model(o);
  Views v = random_views(2, 3, o, 1);
  v.locations = v.locations.narrow(2, 0, 1);
  EXPECT_THROW_WITH(model->step(v, model->initial_state(2)), "views.locations must be (2, 3, 2)");
}

TEST(WorldModels, SavedAndLoadedInSafetensors) {
  test::TempDir tmp;
  for (const std::string kind : {"s2rm", "rims", "gru"}) {
    WorldModelOptions o;
    o.kind = kind;
    o.modules = 3;
    o.top_k = 2;
    o.seed = 4;
    auto model = make_world_model(o);
    const Views v = random_views(2, 3, o, 8);
    auto gen = at::detail::createCPUGenerator(2);
    const at::Tensor q = at::rand({2, 4, o.location_dim}, gen);
    torch::NoGradGuard g;
    const at::Tensor want = model->decode(model->step(v, model->initial_state(2)), q);
    save_world_model(*model, tmp / kind);
    auto back = load_world_model(tmp / kind);
    EXPECT_EQ(back->options().kind, kind);
    EXPECT_TRUE(at::equal(back->decode(back->step(v, back->initial_state(2)), q), want)) << kind;
  }
  // A file of another size or with a field it does not know is refused, naming it.
  test::write_file(tmp / "gru/world_model.json", "{\"kind\": \"gru\", \"hidden\": 8}");
  EXPECT_THROW_WITH(load_world_model(tmp / "gru"), "has shape");
  test::write_file(tmp / "gru/world_model.json", "{\"kind\": \"gru\", \"layers\": 2}");
  EXPECT_THROW_WITH(load_world_model(tmp / "gru"), "no option 'layers'");
}

}  // namespace
}  // namespace mdl
