// ModuleFormer issue benchmark: a ModuleFormer (C=256, 4 blocks, 16 attention and 16 MLP experts of which
// each token uses 2, mlp gates) against the same model pruned to its 4 most used experts of each mixture
// (`mdl experts prune`) and against a dense ModuleFormer of the same active size (1 expert each, twice as
// wide), all in evaluation mode: a forward over 8 x 128 tokens (prefill) and decoding steps at batch 1 with
// the KV cache. Parameters and checkpoint bytes for each. Runs alternate and medians are compared, so the
// ratios come from this one run.
#include <ATen/ATen.h>
#include <torch/utils.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <vector>

#include "harness.h"
#include "mdl/backbones/model.h"
#include "mdl/backbones/moduleformer_experts.h"
#include "mdl/routing/routing_log.h"

namespace mdl::bench {
namespace {

ModelConfig config(bool dense) {
  nlohmann::json j = {{"model_type", "moduleformer"},
                      {"architectures", {"ModuleFormerForCausalLM"}},
                      {"vocab_size", 4096},
                      {"n_embd", 256},
                      {"n_layer", 4},
                      {"n_head", dense ? 8 : 4},
                      {"att_hidden", dense ? 256 : 128},
                      {"ffd_hidden", dense ? 1024 : 512},
                      {"n_att_experts", dense ? 1 : 16},
                      {"k_att", dense ? 1 : 2},
                      {"n_mlp_experts", dense ? 1 : 16},
                      {"k_mlp", dense ? 1 : 2},
                      {"gating_size", 128},
                      {"gate_type", "mlp"},
                      {"block_size", 512},
                      {"history_length", 512}};
  return parse_model_config(j.dump(), "bench");
}

int64_t checkpoint_bytes(const ModelImpl& m) {
  namespace fs = std::filesystem;
  const fs::path dir = fs::temp_directory_path() / ("mdl-bench-mf-" + std::to_string(::getpid()));
  save_model(m, dir.string());
  const int64_t bytes = static_cast<int64_t>(fs::file_size(dir / "model.safetensors"));
  fs::remove_all(dir);
  return bytes;
}

void moduleformer(const Settings& s, Report& r) {
  torch::NoGradGuard no_grad;
  Model full = create_model(config(false));
  full->init_weights(1);
  full->eval();
  Model dense = create_model(config(true));
  dense->init_weights(2);
  dense->eval();
  const int64_t B = s.quick ? 2 : 8, T = s.quick ? 32 : 128;
  const at::Tensor ids = at::randint(3, 4096, {B, T}, at::kLong);
  // The experts random data uses most (what `mdl experts prune` measures on its --data).
  ExpertUsageMeter meter(full->config());
  {
    RoutingLog log;
    ModelInput in;
    in.input_ids = ids;
    in.routing_log = &log;
    full->forward(in);
    meter.add(log);
  }
  const ExpertUsage usage = meter.usage();
  Model pruned = keep_experts(*full, most_used(usage.attention, 4), most_used(usage.mlp, 4));
  pruned->eval();
  struct Entry {
    std::string name;
    Model model;
    std::vector<double> prefill, decode;
  };
  std::vector<Entry> models = {{"16 experts per mixture, top-2", full, {}, {}},
                               {"pruned to the 4 most used per mixture, top-2", pruned, {}, {}},
                               {"dense, same active size (1 expert each, twice as wide)", dense, {}, {}}};
  const int64_t steps = s.quick ? 4 : 32;
  Settings round = s;
  round.min_seconds = s.min_seconds / 2;
  for (int i = 0; i < (s.quick ? 1 : 3); ++i)
    for (auto& e : models) {
      ModelInput in;
      in.input_ids = ids;
      e.prefill.push_back(time_it([&] { e.model->forward(in); }, round));
      e.decode.push_back(time_it(
                             [&] {
                               KVCache cache;
                               ModelInput step;
                               step.cache = &cache;
                               step.input_ids = ids.narrow(0, 0, 1).narrow(1, 0, 1);
                               for (int64_t t = 0; t < steps; ++t) e.model->forward(step);
                             },
                             round) /
                         static_cast<double>(steps));
    }
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  const double full_prefill = median(models[0].prefill), full_decode = median(models[0].decode);
  const int64_t full_bytes = checkpoint_bytes(*full);
  for (size_t i = 0; i < models.size(); ++i) {
    const Entry& e = models[i];
    const double prefill = median(e.prefill), decode = median(e.decode);
    char note[192];
    const int64_t bytes = checkpoint_bytes(*e.model);
    if (i == 0)
      std::snprintf(note, sizeof(note), "baseline; %lld parameters, %.1f MB on disk",
                    static_cast<long long>(e.model->num_parameters()), bytes / 1e6);
    else
      std::snprintf(note, sizeof(note),
                    "%.2fx the 16-expert model's tokens/s; %lld parameters, %.2fx on disk",
                    full_prefill / prefill, static_cast<long long>(e.model->num_parameters()),
                    static_cast<double>(bytes) / full_bytes);
    r.add({"moduleformer", "prefill " + std::to_string(B) + "x" + std::to_string(T) + ", " + e.name,
           static_cast<double>(B * T) / prefill, "tokens/s", note});
    if (i == 0)
      std::snprintf(note, sizeof(note), "baseline");
    else
      std::snprintf(note, sizeof(note), "%.2fx the 16-expert model's tokens/s", full_decode / decode);
    r.add({"moduleformer", "decode at batch 1 (KV cache), " + e.name, 1.0 / decode, "tokens/s", note});
  }
}

}  // namespace

MDL_BENCHMARK(moduleformer, moduleformer);

}  // namespace mdl::bench
