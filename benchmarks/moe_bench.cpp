// Routing issue benchmark: a top-2-of-8 mixture-of-experts SwiGLU MLP (small preset width), forward and
// backward over 4096 tokens, against a dense SwiGLU MLP with the same active parameters (intermediate
// width 2 x an expert's) and against a naive loop over tokens. Ratios are from this one run.
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "harness.h"
#include "mdl/aggregation/aggregator.h"
#include "mdl/routing/group_router.h"
#include "mdl/routing/mixture.h"
#include "mdl/routing/router.h"

namespace mdl::bench {
namespace {

at::Tensor swiglu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3, const at::Tensor& w2) {
  return at::matmul(at::silu(at::matmul(x, w1.t())) * at::matmul(x, w3.t()), w2.t());
}

void moe_mlp(const Settings& s, Report& r) {
  const int64_t C = 384, I = 256, E = 8, K = 2;
  const int64_t N = s.quick ? 512 : 4096;
  auto param = [](std::vector<int64_t> shape, double std) {
    return (at::randn(shape) * std).requires_grad_(true);
  };
  // Each expert's weights are tensors of their own, as in the Mixtral backbone (slicing one stacked
  // parameter would make every slice's backward write a full-size gradient).
  at::Tensor gate = param({E, C}, 0.02);
  std::vector<at::Tensor> w1, w3, w2;
  for (int64_t e = 0; e < E; ++e)
    w1.push_back(param({I, C}, 0.05)), w3.push_back(param({I, C}, 0.05)), w2.push_back(param({C, I}, 0.05));
  at::Tensor d1 = param({K * I, C}, 0.05), d3 = param({K * I, C}, 0.05), d2 = param({C, K * I}, 0.05);
  at::Tensor x = at::randn({N, C}).requires_grad_(true);
  RouterOptions o;
  o.k = K;
  auto router = make_router(o);
  std::vector<at::Tensor> all = {gate, d1, d3, d2, x};
  for (int64_t e = 0; e < E; ++e) all.insert(all.end(), {w1[e], w3[e], w2[e]});
  auto clear = [&] {
    for (auto& t : all)
      if (t.grad().defined()) t.mutable_grad().zero_();
  };
  auto moe_step = [&] {
    clear();
    Routing routing = router->route(at::matmul(x, gate.t()), E, {});
    at::Tensor y = dispatch(
        x, routing, C, [&](int64_t e, const at::Tensor& rows) { return swiglu(rows, w1[e], w3[e], w2[e]); });
    y.sum().backward();
  };
  // The same experts as a group's members behind a LearnedRouter and a WeightedSum: the path of the
  // Mixtral and upcycled-ViT layers (backbones/expert_router.h) and of lora_moe and fusion mixtures.
  LearnedRouter group_router("bench.moe", "bench", o,
                             [&](const at::Tensor& rows) { return at::matmul(rows, gate.t()); });
  GroupMembers experts;
  experts.count = E;
  experts.out_features = C;
  experts.reads_current = false;
  experts.change = [&](int64_t e, const at::Tensor& rows, const at::Tensor&) {
    return swiglu(rows, w1[e], w3[e], w2[e]);
  };
  WeightedSum sum;
  auto group_step = [&] {
    clear();
    const at::Tensor x3 = x.unsqueeze(0);  // (1, N, C)
    sum.combine(x3, at::Tensor(), group_router.route(x3, E, true), experts).sum().backward();
  };
  auto dense_step = [&] {
    clear();
    swiglu(x, d1, d3, d2).sum().backward();
  };
  // Alternate the two for several rounds and compare medians, so a shared machine's drift stays out.
  std::vector<double> moe_runs, dense_runs, group_runs;
  Settings round = s;
  round.min_seconds = s.min_seconds / 2;
  for (int i = 0; i < (s.quick ? 1 : 5); ++i) {
    moe_runs.push_back(time_it(moe_step, round));
    dense_runs.push_back(time_it(dense_step, round));
    group_runs.push_back(time_it(group_step, round));
  }
  std::sort(group_runs.begin(), group_runs.end());
  const double group = group_runs[group_runs.size() / 2];
  std::sort(moe_runs.begin(), moe_runs.end());
  std::sort(dense_runs.begin(), dense_runs.end());
  const double moe = moe_runs[moe_runs.size() / 2], dense = dense_runs[dense_runs.size() / 2];
  // Naive: route as above, then every token through its experts one at a time.
  const int64_t naive_tokens = s.quick ? 16 : 128;  // the loop is slow; its time is scaled to N tokens
  at::Tensor xn = x.detach().narrow(0, 0, naive_tokens).clone().requires_grad_(true);
  Settings once = s;
  once.min_seconds = 0;
  const double naive = time_it(
                           [&] {
                             clear();
                             Routing routing = router->route(at::matmul(xn, gate.t()), E, {});
                             at::Tensor idx = routing.expert.view({K, naive_tokens}).t(),
                                        w = routing.weight.view({K, naive_tokens}).t();
                             std::vector<at::Tensor> outs;
                             for (int64_t t = 0; t < naive_tokens; ++t) {
                               at::Tensor xt = xn.narrow(0, t, 1);
                               at::Tensor yt = at::zeros({1, C});
                               for (int64_t j = 0; j < K; ++j) {
                                 const int64_t e = idx[t][j].item<int64_t>();
                                 yt = yt + w[t][j] * swiglu(xt, w1[e], w3[e], w2[e]);
                               }
                               outs.push_back(yt);
                             }
                             at::cat(outs, 0).sum().backward();
                           },
                           once) *
                       static_cast<double>(N) / naive_tokens;
  char note[128];
  const std::string what =
      "top-2 of 8 SwiGLU experts (C=384, I=256), fwd+bwd, " + std::to_string(N) + " tokens";
  std::snprintf(note, sizeof(note), "%.2fx dense same active params (target <= 1.5x)", moe / dense);
  r.add({"moe", "grouped dispatch, " + what, N / moe, "tokens/s", note});
  r.add({"moe", "dense SwiGLU MLP I=512 (same active parameters)", N / dense, "tokens/s", "baseline"});
  std::snprintf(note, sizeof(note), "%.3fx the bare dispatch's time (target <= 1.05x)", group / moe);
  r.add({"moe", "the experts as a group (LearnedRouter + WeightedSum, as the backbones run them)", N / group,
         "tokens/s", note});
  std::snprintf(note, sizeof(note), "grouped dispatch is %.1fx faster", naive / moe);
  r.add({"moe", "naive per-token loop (timed on " + std::to_string(naive_tokens) + " tokens, scaled)",
         N / naive, "tokens/s", note});
}

}  // namespace

MDL_BENCHMARK(moe_mlp, moe_mlp);

}  // namespace mdl::bench
