// Foundation benchmarks: the machine's fp32 GEMM ceiling, and backbone forward throughput for the tiny
// and small presets at batch 1 and 32, as tokens/s and as a fraction of that ceiling.
#include <ATen/ATen.h>
#include <torch/utils.h>

#include <cstdio>

#include "harness.h"
#include "mdl/backbones/init_model.h"
#include "mdl/backbones/model.h"

namespace mdl::bench {
namespace {

double gemm_gflops(int64_t n, const Settings& s) {
  at::Tensor a = at::randn({n, n}), b = at::randn({n, n}), c = at::empty({n, n});
  double t = time_it([&] { at::mm_out(c, a, b); }, s);
  return 2.0 * n * n * n / t / 1e9;
}

double g_peak = 0;

void gemm(const Settings& s, Report& r) {
  for (int64_t n : {512, 1024, 2048}) {
    if (s.quick && n > 1024) continue;
    double g = gemm_gflops(n, s);
    g_peak = std::max(g_peak, g);
    r.add({"machine", "fp32 GEMM " + std::to_string(n) + "^3", g, "GFLOP/s",
           n == 2048 || (s.quick && n == 1024) ? "reference ceiling" : ""});
  }
}

// Multiply-accumulates per token in the projections (what the GEMMs do), for the ceiling ratio.
double matmul_flops_per_token(const ModelImpl& m) {
  double macs = 0;
  for (const auto& site : m.sites())
    if (site->info().kind == SiteKind::linear)
      macs += double(site->info().in_features) * site->info().out_features;
  return 2 * macs;
}

void forward(const Settings& s, Report& r) {
  torch::NoGradGuard no_grad;
  for (const std::string preset : {"tiny", "small"}) {
    for (const std::string arch : {"gpt2", "llama"}) {
      ModelConfig c = preset_config(arch, preset, preset == "tiny" ? 512 : 8192, HeadKind::causal_lm, 2);
      Model m = create_model(c);
      m->init_weights(0);
      m->eval();
      const double flops = matmul_flops_per_token(*m);
      for (int64_t batch : {1, 32}) {
        const int64_t T = s.quick ? 32 : 128;
        at::Tensor ids = at::randint(0, c.vocab_size, {batch, T}, at::kLong);
        ModelInput in;
        in.input_ids = ids;
        double t = time_it([&] { m->forward(in); }, s);
        const double tps = batch * T / t;
        char note[96];
        std::snprintf(note, sizeof(note), "%.2f of GEMM peak (%.1f GFLOP/s in projections)",
                      g_peak > 0 ? tps * flops / 1e9 / g_peak : 0.0, tps * flops / 1e9);
        r.add(
            {"backbone",
             "forward " + arch + "-" + preset + " batch " + std::to_string(batch) + " x " + std::to_string(T),
             tps, "tokens/s", note});
      }
    }
  }
}

}  // namespace

MDL_BENCHMARK(gemm, gemm);
MDL_BENCHMARK(forward, forward);

}  // namespace mdl::bench
