// ModuleFormer against an implementation written here from the equations, in float64, one token at a
// time: a checkpoint in IBM's layout (config.json with IBM's keys, tensors under modeling_moduleformer.py's
// names, its attention buffers included) is written by the test itself, loaded, and its logits compared
// (1e-5) for each gate type, with left padding and through the KV cache. The routers' auxiliary losses
// (MI, switch + z) equal their formulas over the reference's router probabilities; the routing log has a
// record per mixture; the model saves back in the same layout; LoRA attaches at its key and value
// projections; `mdl init-model --arch moduleformer` makes one; bad configs are refused naming the field.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/utils.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "mdl/backbones/init_model.h"
#include "mdl/backbones/model.h"
#include "mdl/io/checkpoint.h"
#include "mdl/io/json_file.h"
#include "mdl/io/safetensors.h"
#include "mdl/modules/module_set.h"
#include "mdl/modules/module_type.h"
#include "mdl/routing/router.h"
#include "mdl/routing/routing_log.h"
#include "test_util.h"

namespace mdl {
namespace {

namespace fs = std::filesystem;
using Tensors = std::map<std::string, at::Tensor>;

// Sizes of the test's checkpoint.
constexpr int64_t V = 40, C = 16, L = 2, H = 2, A = 8, F = 12, Ea = 4, Em = 5, G = 8;

nlohmann::json ibm_config(const std::string& gate, const std::string& aux, double weight) {
  return {{"model_type", "moduleformer"},
          {"architectures", {"ModuleFormerForCausalLM"}},
          {"vocab_size", V},
          {"n_embd", C},
          {"n_layer", L},
          {"n_head", H},
          {"att_hidden", A},
          {"ffd_hidden", F},
          {"n_att_experts", Ea},
          {"k_att", 2},
          {"n_mlp_experts", Em},
          {"k_mlp", 2},
          {"gating_size", G},
          {"gate_type", gate},
          {"aux_loss_type", aux},
          {"aux_loss_weight", weight},
          {"sample_topk", 0},
          {"block_size", 16},
          {"history_length", 16},
          {"activation_function", "gelu_new"},
          {"layer_norm_epsilon", 1e-5},
          {"tie_word_embeddings", false},
          {"bos_token_id", 1},
          {"eos_token_id", 2}};
}

/// The tensors of IBM's ModuleFormerForCausalLM state dict, random, by name (float32 on disk).
Tensors ibm_tensors(const std::string& gate, uint64_t seed) {
  auto gen = at::detail::createCPUGenerator(seed);
  auto r = [&](std::vector<int64_t> shape, double s = 0.3) { return at::randn(shape, gen) * s; };
  Tensors t;
  t["transformer.wte.weight"] = r({V, C}, 1.0);
  auto add_gate = [&](const std::string& p, int64_t E) {
    if (gate == "mlp") {
      t[p + ".w_gate.0.weight"] = r({G, C});
      t[p + ".w_gate.0.bias"] = r({G});
      t[p + ".w_gate.3.weight"] = r({E, G}, 1.0);
    } else if (gate == "linear") {
      t[p + ".w_gate.0.weight"] = r({E, C}, 1.0);
    } else {
      t[p + ".w_gate.weight"] = r({G, C});
      t[p + ".expert_centroids"] = r({E, G}, 1.0);
      t[p + ".temperature"] = at::full({1}, 0.7);
    }
  };
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "transformer.h." + std::to_string(l);
    for (const char* n : {".ln_1", ".ln_2"}) {
      t[p + n + ".weight"] = 1 + r({C}, 0.1);
      t[p + n + ".bias"] = r({C}, 0.1);
    }
    t[p + ".attn.q_proj.experts.weight"] = r({Ea, C, A});
    t[p + ".attn.q_proj.output_experts.weight"] = r({Ea, A, C});
    add_gate(p + ".attn.q_proj.gate", Ea);
    for (const char* n : {".attn.k_proj", ".attn.v_proj"}) {
      t[p + n + ".weight"] = r({A, C});
      t[p + n + ".bias"] = r({A}, 0.1);
    }
    t[p + ".attn.mask"] = at::ones({32, 32}).tril().to(at::kChar);  // IBM's persistent buffers
    t[p + ".attn.cum_weight"] = at::ones({32, 32}).tril(-1);
    t[p + ".mlpf.experts.weight"] = r({Em, C, F});
    t[p + ".mlpf.output_experts.weight"] = r({Em, F, C});
    add_gate(p + ".mlpf.gate", Em);
  }
  t["transformer.ln_f.weight"] = 1 + r({C}, 0.1);
  t["transformer.ln_f.bias"] = r({C}, 0.1);
  t["lm_head.weight"] = r({V, C});
  return t;
}

/// Writes a checkpoint directory as IBM's code saves one.
std::string write_ibm_checkpoint(const test::TempDir& root, const std::string& gate, const std::string& aux,
                                 double weight, uint64_t seed) {
  const std::string dir = root / ("moduleformer-" + gate + "-" + aux);
  fs::create_directories(dir);
  std::ofstream(dir + "/config.json") << ibm_config(gate, aux, weight).dump(2);
  io::save_safetensors(dir + "/model.safetensors", ibm_tensors(gate, seed), {{"format", "pt"}});
  return dir;
}

// ---- the reference: float64, one sequence, one token at a time
// ---------------------------------------------
struct Reference {
  Tensors w;
  std::string gate;
  std::vector<at::Tensor> probs = {},
                          logits = {};  // every router's (T, E), in forward order (att, mlp per layer)

  at::Tensor p(const std::string& name) const { return w.at(name).to(at::kDouble); }
  static at::Tensor ln(const at::Tensor& x, const at::Tensor& g, const at::Tensor& b) {
    const at::Tensor mu = x.mean(-1, true), var = (x - mu).pow(2).mean(-1, true);
    return (x - mu) / (var + 1e-5).sqrt() * g + b;
  }
  static at::Tensor gelu_tanh(const at::Tensor& x) {
    return 0.5 * x * (1 + at::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x.pow(3))));
  }
  at::Tensor gate_logits(const std::string& g, const at::Tensor& x) const {
    if (gate == "mlp") {
      const at::Tensor h = at::matmul(x, p(g + ".w_gate.0.weight").t()) + p(g + ".w_gate.0.bias");
      return at::matmul(0.5 * h * (1 + at::erf(h / std::sqrt(2.0))), p(g + ".w_gate.3.weight").t());
    }
    if (gate == "linear") return at::matmul(x, p(g + ".w_gate.0.weight").t());
    const at::Tensor z = at::matmul(x, p(g + ".w_gate.weight").t()), c = p(g + ".expert_centroids");
    const at::Tensor cos = at::matmul(z / z.norm(2, -1, true), (c / c.norm(2, -1, true)).t());
    return cos * std::exp(p(g + ".temperature").item<double>());
  }
  /// The top-2 (expert, probability) of each row, recording the router.
  std::vector<std::vector<std::pair<int64_t, double>>> route(const std::string& g, const at::Tensor& x) {
    const at::Tensor l = gate_logits(g, x), pr = at::softmax(l, -1);
    logits.push_back(l), probs.push_back(pr);
    std::vector<std::vector<std::pair<int64_t, double>>> out;
    for (int64_t t = 0; t < x.size(0); ++t) {
      std::vector<std::pair<int64_t, double>> row;
      std::vector<double> v(static_cast<size_t>(pr.size(1)));
      for (int64_t e = 0; e < pr.size(1); ++e) v[e] = pr[t][e].item<double>();
      for (int j = 0; j < 2; ++j) {
        const auto best = std::max_element(v.begin(), v.end());
        row.emplace_back(best - v.begin(), *best);
        *best = -1;
      }
      out.push_back(row);
    }
    return out;
  }
  /// Logits (T, V) of one sequence; `real` (T) marks its real tokens (padding is transparent to keys).
  at::Tensor forward(const at::Tensor& ids, const std::vector<bool>& real) {
    const int64_t T = ids.size(0), D = A / H;
    at::Tensor x = p("transformer.wte.weight").index_select(0, ids);  // (T, C)
    for (int64_t l = 0; l < L; ++l) {
      const std::string b = "transformer.h." + std::to_string(l);
      const at::Tensor a = ln(x, p(b + ".ln_1.weight"), p(b + ".ln_1.bias"));
      const at::Tensor K = at::matmul(a, p(b + ".attn.k_proj.weight").t()) + p(b + ".attn.k_proj.bias");
      const at::Tensor Vv = at::matmul(a, p(b + ".attn.v_proj.weight").t()) + p(b + ".attn.v_proj.bias");
      const auto att = route(b + ".attn.q_proj.gate", a);
      at::Tensor out = at::zeros({T, C}, at::kDouble);
      for (int64_t t = 0; t < T; ++t)
        for (const auto& [e, g] : att[t]) {
          const at::Tensor q = at::matmul(a[t], p(b + ".attn.q_proj.experts.weight")[e]);  // (A)
          at::Tensor y = at::zeros({A}, at::kDouble);
          for (int64_t h = 0; h < H; ++h) {
            auto z = [&](int64_t s) {
              const double lg = (q.narrow(0, h * D, D) * K[s].narrow(0, h * D, D)).sum().item<double>() /
                                std::sqrt(static_cast<double>(D));
              return 1 / (1 + std::exp(-lg));
            };
            for (int64_t s = 0; s <= t; ++s) {
              if (!real[s]) continue;
              double weight = z(s);  // key s takes its share of what the later keys left
              for (int64_t u = s + 1; u <= t; ++u)
                if (real[u]) weight *= 1 - z(u);
              y.narrow(0, h * D, D).add_(Vv[s].narrow(0, h * D, D) * weight);
            }
          }
          out[t] += g * at::matmul(y, p(b + ".attn.q_proj.output_experts.weight")[e]);
        }
      x = x + out;
      const at::Tensor m = ln(x, p(b + ".ln_2.weight"), p(b + ".ln_2.bias"));
      const auto mlp = route(b + ".mlpf.gate", m);
      out = at::zeros({T, C}, at::kDouble);
      for (int64_t t = 0; t < T; ++t)
        for (const auto& [e, g] : mlp[t])
          out[t] += g * at::matmul(gelu_tanh(at::matmul(m[t], p(b + ".mlpf.experts.weight")[e])),
                                   p(b + ".mlpf.output_experts.weight")[e]);
      x = x + out;
    }
    x = ln(x, p("transformer.ln_f.weight"), p("transformer.ln_f.bias"));
    return at::matmul(x, p("lm_head.weight").t());
  }
};

at::Tensor ids_of(std::vector<int64_t> v) {
  return at::tensor(v, at::kLong);
}

double max_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

class ModuleFormerGates : public ::testing::TestWithParam<std::string> {};

TEST_P(ModuleFormerGates, IbmCheckpointLoadsAndMatchesTheFloat64Reference) {
  test::TempDir root;
  const std::string dir = write_ibm_checkpoint(root, GetParam(), "mi", 0.0, 3);
  LoadOptions o;
  o.dtype = at::kDouble;
  Model m = load_model(dir, o);
  EXPECT_EQ(m->config().architecture, "ModuleFormerForCausalLM");
  EXPECT_EQ(m->num_parameters(), estimated_parameters(m->config()));
  torch::NoGradGuard g;
  Reference ref{io::load_safetensors(dir + "/model.safetensors"), GetParam()};
  const at::Tensor ids = ids_of({5, 9, 3, 17, 22, 8, 30});
  ModelInput in;
  in.input_ids = ids.view({1, -1});
  const double d = max_diff(m->forward(in)[0], ref.forward(ids, std::vector<bool>(7, true)));
  std::printf("[moduleformer %s] max |logits - reference| = %.3g\n", GetParam().c_str(), d);
  EXPECT_LE(d, 1e-5);

  // Left padding: each row's real positions as the sequence alone.
  ModelInput batch;
  batch.input_ids = at::stack({ids, at::cat({at::zeros({3}, at::kLong), ids.narrow(0, 0, 4)})});
  batch.attention_mask = at::ones({2, 7}, at::kLong);
  batch.attention_mask[1].narrow(0, 0, 3).fill_(0);
  const at::Tensor both = m->forward(batch);
  EXPECT_LE(max_diff(both[0], ref.forward(ids, std::vector<bool>(7, true))), 1e-5);
  EXPECT_LE(max_diff(both[1].narrow(0, 3, 4), ref.forward(ids.narrow(0, 0, 4), std::vector<bool>(4, true))),
            1e-5);
  // The reference's own padding (transparent keys) agrees with the sequence alone.
  const at::Tensor padded =
      ref.forward(batch.input_ids[1], {false, false, false, true, true, true, true}).narrow(0, 3, 4);
  EXPECT_LE(max_diff(both[1].narrow(0, 3, 4), padded), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Gates, ModuleFormerGates, ::testing::Values("mlp", "linear", "gmm"));

TEST(ModuleFormer, CachedStepsEqualTheWholeSequence) {
  test::TempDir root;
  Model m = load_model(write_ibm_checkpoint(root, "mlp", "mi", 0.0, 4));
  torch::NoGradGuard g;
  const at::Tensor ids = ids_of({4, 11, 7, 19, 2, 33, 6, 25}).view({1, -1});
  ModelInput whole;
  whole.input_ids = ids;
  const at::Tensor want = m->forward(whole)[0];  // (8, V)
  KVCache cache;
  ModelInput prompt;
  prompt.input_ids = ids.narrow(1, 0, 5);
  prompt.cache = &cache;
  EXPECT_CLOSE(m->forward(prompt)[0], want.narrow(0, 0, 5), 1e-5);
  for (int64_t t = 5; t < 8; ++t) {
    ModelInput step;
    step.input_ids = ids.narrow(1, t, 1);
    step.cache = &cache;
    EXPECT_CLOSE(m->forward(step)[0][0], want[t], 1e-5) << "step " << t;
  }
  EXPECT_EQ(cache.length(), 8);
}

TEST(ModuleFormer, AuxLossesAreTheirFormulasSummedOverLayersAndTheLogHasEveryMixture) {
  test::TempDir root;
  const at::Tensor ids = ids_of({5, 9, 3, 17, 22, 8, 30, 1, 12});
  for (const std::string aux : {"mi", "switch"}) {
    const double weight = 0.3;
    const std::string dir = write_ibm_checkpoint(root, "mlp", aux, weight, 5);
    LoadOptions o;
    o.dtype = at::kDouble;
    Model m = load_model(dir, o);
    Reference ref{io::load_safetensors(dir + "/model.safetensors"), "mlp"};
    ref.forward(ids, std::vector<bool>(9, true));
    double want = 0;
    for (size_t i = 0; i < ref.probs.size(); ++i) {
      const at::Tensor& p = ref.probs[i];  // (T, E)
      if (aux == "mi") {
        const at::Tensor mean = p.mean(0);
        const double h_given_x = -(p * (p + 1e-8).log()).sum(-1).mean().item<double>();
        const double h = -(mean * (mean + 1e-8).log()).sum().item<double>();
        want += h_given_x - h;
      } else {  // IBM: E sum_e norm1(sum_x p)_e norm1(#routed)_e + 0.1 mean(logsumexp^2)
        const int64_t E = p.size(1);
        at::Tensor routed = at::zeros({E}, at::kDouble);
        for (int64_t t = 0; t < p.size(0); ++t) {
          const at::Tensor top = std::get<1>(p[t].topk(2));
          for (int j = 0; j < 2; ++j) routed[top[j].item<int64_t>()] += 1;
        }
        const at::Tensor sp = p.sum(0);
        want += E * (sp / sp.sum() * routed / routed.sum()).sum().item<double>() +
                0.1 * at::logsumexp(ref.logits[i], -1).pow(2).mean().item<double>();
      }
    }
    want *= weight;
    RoutingLog log;
    ModelInput in;
    in.input_ids = ids.view({1, -1});
    in.routing_log = &log;
    m->forward(in);
    EXPECT_NEAR(log.aux_loss().item<double>(), want, 1e-5 * std::max(1.0, std::abs(want))) << aux;
    ASSERT_EQ(log.stats().size(), static_cast<size_t>(2 * L)) << aux;
    EXPECT_EQ(log.stats()[0].site, "transformer.h.0.attn");
    EXPECT_EQ(log.stats()[1].site, "transformer.h.0.mlpf");
    EXPECT_EQ(log.stats()[1].load.size(), static_cast<size_t>(Em));
    EXPECT_EQ(log.stats()[0].rows, 9);
    double load = 0;
    for (double x : log.stats()[1].load) load += x;
    EXPECT_NEAR(load, 1.0, 1e-9);
    EXPECT_GT(log.stats()[1].usage_entropy, 0.0);
  }
}

// The load-concentration loss before pruning comes from config.json's mdl_router (the router of both
// mixtures of every block): the aux loss is its weight times the sum of every router's H(e).
TEST(ModuleFormer, ConfigRouterAddsTheLoadConcentrationLoss) {
  test::TempDir root;
  const std::string dir = write_ibm_checkpoint(root, "mlp", "mi", 0.0, 8);
  nlohmann::json c = ibm_config("mlp", "mi", 0.0);
  c["mdl_router"] = {{"kind", "top_k"}, {"k", 2}, {"normalize", false}, {"concentration_coef", 0.5}};
  std::ofstream(dir + "/config.json") << c.dump();
  LoadOptions o;
  o.dtype = at::kDouble;
  Model m = load_model(dir, o);
  EXPECT_DOUBLE_EQ(m->router()->options().concentration_coef, 0.5);
  Reference ref{io::load_safetensors(dir + "/model.safetensors"), "mlp"};
  const at::Tensor ids = ids_of({5, 9, 3, 17, 22, 8});
  ref.forward(ids, std::vector<bool>(6, true));
  double want = 0;
  for (const auto& p : ref.probs) {
    const at::Tensor mean = p.mean(0);
    want += 0.5 * -(mean * (mean + 1e-8).log()).sum().item<double>();
  }
  RoutingLog log;
  ModelInput in;
  in.input_ids = ids.view({1, -1});
  in.routing_log = &log;
  m->forward(in);
  EXPECT_NEAR(log.aux_loss().item<double>(), want, 1e-6);
}

TEST(ModuleFormer, SavesBackInIbmLayoutAndEveryParameterLearns) {
  test::TempDir root;
  const std::string dir = write_ibm_checkpoint(root, "gmm", "mi", 0.01, 6);
  Model m = load_model(dir);
  save_model(*m, root / "saved");
  const nlohmann::json config = io::read_json(root / "saved/config.json");
  for (const char* key :
       {"n_embd", "att_hidden", "ffd_hidden", "n_att_experts", "k_att", "n_mlp_experts", "k_mlp",
        "gating_size", "gate_type", "aux_loss_type", "aux_loss_weight", "block_size", "history_length"})
    EXPECT_EQ(config[key], ibm_config("gmm", "mi", 0.01)[key]) << key;
  Tensors written = ibm_tensors("gmm", 6), saved = io::load_safetensors(root / "saved/model.safetensors");
  for (auto it = written.begin(); it != written.end();)
    it =
        it->first.find(".attn.mask") != std::string::npos || it->first.find("cum_weight") != std::string::npos
            ? written.erase(it)
            : std::next(it);
  ASSERT_EQ(saved.size(), written.size());
  for (const auto& [name, t] : written) {
    ASSERT_TRUE(saved.count(name)) << name;
    EXPECT_TRUE(at::equal(saved[name], t)) << name;
  }
  // Training from scratch reaches every weight (gates, experts, shared keys and values, norms).
  m->train();
  ModelInput in;
  in.input_ids = ids_of({3, 8, 13, 21, 34, 5}).view({1, -1});
  RoutingLog log;
  in.routing_log = &log;
  (m->lm_loss(in, ids_of({8, 13, 21, 34, 5, 3}).view({1, -1})) + log.aux_loss()).backward();
  for (const auto& p : m->named_parameters()) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_GT(p.value().grad().abs().sum().item<double>(), 0.0) << p.key();
  }
}

TEST(ModuleFormer, ModulesAttachRoutersSwapAndInitModelMakesOne) {
  test::TempDir root;
  InitModelOptions o;
  o.arch = "moduleformer";
  o.seed = 2;
  const InitModelResult made = init_model(o, root / "tiny");
  EXPECT_EQ(made.config.architecture, "ModuleFormerForCausalLM");
  Model m = load_model(root / "tiny");
  EXPECT_EQ(m->num_parameters(), made.parameters);
  EXPECT_EQ(m->num_parameters(), estimated_parameters(m->config()));
  torch::NoGradGuard g;
  ModelInput in;
  in.input_ids = at::arange(3, 12, at::kLong).view({1, -1});
  const at::Tensor base = m->forward(in);
  EXPECT_TRUE(at::isfinite(base).all().item<bool>());
  // LoRA at the default targets (the shared key and value projections), non-zero B: outputs change.
  ModuleSet set(m);
  ModuleConfig lora;
  lora.type = "lora";
  lora.targets = module_type("lora").default_targets(Arch::moduleformer, lora);
  set.add("lora", lora);
  EXPECT_EQ(set.tensors("lora").size(), static_cast<size_t>(2 * 2 * m->config().n_layer));
  for (auto& [name, t] : set.tensors("lora")) t.normal_(0.0, 0.5);
  set.set_active("lora", true);
  EXPECT_CHANGED(m->forward(in), base);
  set.set_active("lora", false);
  EXPECT_CLOSE(m->forward(in), base, 1e-6);
  // Another router on both mixtures: a softmax over every expert changes the outputs; task level refused.
  ASSERT_NE(m->router(), nullptr);
  EXPECT_FALSE(m->router()->options().normalize);
  RouterOptions softmax;
  softmax.kind = "softmax";
  m->set_router(softmax);
  EXPECT_EQ(m->router()->options().kind, "softmax");
  EXPECT_CHANGED(m->forward(in), base);
  RouterOptions task;
  task.level = "task";
  EXPECT_THROW_WITH(m->set_router(task), "task-level routing needs per-task logits");
}

TEST(ModuleFormer, BadConfigsAreRefusedNamingTheField) {
  auto refused = [](nlohmann::json c, const std::string& want) {
    EXPECT_THROW_WITH(parse_model_config(c.dump(), "mf/config.json"), want.c_str());
  };
  nlohmann::json c = ibm_config("mlp", "mi", 0);
  c["k_att"] = 9;
  refused(c, "'mf/config.json': k_att 9 and k_mlp 2 must be at most n_att_experts 4");
  c = ibm_config("mlp", "mi", 0);
  c["att_hidden"] = 9;
  refused(c, "att_hidden 9 must be a multiple of n_head 2");
  c = ibm_config("softmax", "mi", 0);
  refused(c, "gate_type 'softmax' is unknown; expected linear, mlp or gmm");
  c = ibm_config("mlp", "load", 0);
  refused(c, "aux_loss_type 'load' is unknown; expected mi or switch");
  c = ibm_config("mlp", "mi", 0);
  c["sample_topk"] = 3;
  refused(c, "sample_topk 3 must be at most k_att and k_mlp");
  // A checkpoint whose experts do not match its config: the tensor and both shapes are named.
  test::TempDir root;
  const std::string dir = write_ibm_checkpoint(root, "mlp", "mi", 0.0, 7);
  c = ibm_config("mlp", "mi", 0);
  c["ffd_hidden"] = 11;
  std::ofstream(dir + "/config.json") << c.dump();
  EXPECT_THROW_WITH(load_model(dir), "transformer.h.0.mlpf.experts.weight");
}

}  // namespace
}  // namespace mdl
