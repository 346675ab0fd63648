#include "mdl/backbones/moe_convert.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/utils.h>

#include <algorithm>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>

#include "mdl/core/error.h"
#include "mdl/core/site_recorder.h"
#include "mdl/ops/functional.h"
#include "mdl/routing/mixture.h"

namespace mdl {
namespace {

void check_dense_llama(const ModelImpl& model, const char* where) {
  const ModelConfig& c = model.config();
  MDL_CHECK(c.arch == Arch::llama && c.num_experts == 0, "[", where,
            "] needs a dense Llama-family model (SwiGLU MLP, "
            "the Mixtral expert layout); got ",
            c.architecture, c.num_experts > 0 ? " which already has experts" : "");
  MDL_CHECK(!c.mlp_bias, "[", where, "] Mixtral experts have no biases, but this model's MLP has (mlp_bias)");
}

ModelConfig mixtral_config(const ModelConfig& dense, int64_t experts, int64_t top_k) {
  MDL_CHECK(experts >= 1 && top_k >= 1 && top_k <= experts, "[moe] top_k must be in 1..experts, got top_k ",
            top_k, " with ", experts, " experts");
  ModelConfig c = dense;
  if (dense.arch == Arch::vit) {  // same model type, experts in the config
    c.num_experts = experts;
    c.experts_per_token = top_k;
    return c;
  }
  c.model_type = "mixtral";
  std::string a = dense.architecture;
  const size_t pos = a.find("For");
  c.architecture = "Mixtral" + (pos == std::string::npos ? std::string("Model") : a.substr(pos));
  c.num_experts = experts;
  c.experts_per_token = top_k;
  return c;
}

std::map<std::string, at::Tensor> params(const ModelImpl& m) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : m.named_parameters()) out[p.key()] = p.value();
  return out;
}

/// "model.layers.3.block_sparse_moe.experts.5.w1.weight" -> (3, 5, "w1"); false for other names.
bool parse_expert(const std::string& name, int64_t& layer, int64_t& expert, std::string& w) {
  const std::string tag = ".block_sparse_moe.experts.";
  const size_t t = name.find(tag);
  if (t == std::string::npos) return false;
  const size_t ls = name.rfind("layers.", t) + 7;
  layer = std::stoll(name.substr(ls, t - ls));
  const size_t es = t + tag.size(), ee = name.find('.', es);
  expert = std::stoll(name.substr(es, ee - es));
  w = name.substr(ee + 1, 2);
  return true;
}

std::string dense_name(int64_t layer, const std::string& w) {
  const std::string p = "model.layers." + std::to_string(layer) + ".mlp.";
  return p + (w == "w1" ? "gate_proj" : w == "w3" ? "up_proj" : "down_proj") + ".weight";
}

/// Balanced k-means: `features` (I, D) rows into E groups of I / E each; returns each row's group.
std::vector<int64_t> balanced_kmeans(const at::Tensor& features, int64_t E, int64_t iterations,
                                     uint64_t seed) {
  const int64_t I = features.size(0), cap = I / E;
  at::Tensor f = features.to(at::kFloat);
  f = f / f.norm(2, {1}, true).clamp_min(1e-12);
  auto gen = at::detail::createCPUGenerator(seed);
  at::Tensor centroids = f.index_select(0, at::randperm(I, gen, at::kLong).narrow(0, 0, E));  // (E, D)
  std::vector<int64_t> group(static_cast<size_t>(I), -1);
  for (int64_t it = 0; it < iterations; ++it) {
    at::Tensor scores = at::matmul(f, centroids.t()).contiguous();  // (I, E) cosine similarity
    at::Tensor order = scores.reshape({-1}).argsort(0, /*descending=*/true).contiguous();
    const int64_t* o = order.data_ptr<int64_t>();
    std::fill(group.begin(), group.end(), -1);
    std::vector<int64_t> count(static_cast<size_t>(E), 0);
    for (int64_t k = 0, assigned = 0; k < I * E && assigned < I; ++k) {  // best pairs first, groups capped
      const int64_t i = o[k] / E, e = o[k] % E;
      if (group[i] >= 0 || count[e] >= cap) continue;
      group[i] = e, ++count[e], ++assigned;
    }
    at::Tensor g = at::tensor(group, at::kLong);
    at::Tensor sums = at::zeros_like(centroids).index_add(0, g, f);
    centroids = sums / sums.norm(2, {1}, true).clamp_min(1e-12);
  }
  return group;
}

}  // namespace

/// An upcycled ViT expert's tensor -> the dense tensor it copies:
/// "vit.encoder.layer.3.moe.experts.5.output.dense.bias" -> "vit.encoder.layer.3.output.dense.bias".
std::string vit_dense_name(const std::string& name) {
  const std::string tag = ".moe.experts.";
  const size_t t = name.find(tag);
  if (t == std::string::npos) return "";
  const size_t after = name.find('.', t + tag.size());
  return name.substr(0, t) + name.substr(after);
}

Model upcycle(const ModelImpl& dense, const UpcycleOptions& o) {
  const bool vit = dense.config().arch == Arch::vit;
  if (vit)
    MDL_CHECK(dense.config().num_experts == 0, "[upcycle] this ViT already has experts");
  else
    check_dense_llama(dense, "upcycle");
  torch::NoGradGuard no_grad;
  ModelConfig c = mixtral_config(dense.config(), o.experts, o.top_k);
  c.router_json = o.router_json;
  Model m = create_model(c);
  m->to(dense.device(), dense.dtype());
  auto from = params(dense);
  auto gen = at::detail::createCPUGenerator(o.seed);
  for (auto& p : m->named_parameters()) {
    const std::string& name = p.key();
    int64_t layer = 0, expert = 0;
    std::string w;
    const std::string vit_source = vit ? vit_dense_name(name) : "";
    if (!vit_source.empty() || (!vit && parse_expert(name, layer, expert, w))) {
      at::Tensor src = from.at(vit ? vit_source : dense_name(layer, w));
      at::Tensor copy = src.to(at::kFloat).clone();
      if (o.noise > 0)
        copy +=
            at::empty_like(copy).normal_(0.0, 1.0, gen) * (o.noise * src.to(at::kFloat).std().item<double>());
      p.value().copy_(copy);
    } else if (name.find(".block_sparse_moe.gate.") != std::string::npos ||
               name.find(".moe.gate.") != std::string::npos) {
      p.value().copy_(at::empty(p.value().sizes()).normal_(0.0, c.initializer_range, gen));
    } else {
      auto it = from.find(name);
      MDL_CHECK(it != from.end(), "[upcycle] the dense model has no tensor '", name, "'");
      p.value().copy_(it->second);
    }
  }
  return m;
}

double MoefyReport::mean_kept() const {
  return kept.empty() ? 0.0
                      : std::accumulate(kept.begin(), kept.end(), 0.0) / static_cast<double>(kept.size());
}

Model moefy(ModelImpl& dense, const MoefyOptions& o, const at::Tensor& sample_ids, MoefyReport* report) {
  check_dense_llama(dense, "moefy");
  const ModelConfig& dc = dense.config();
  MDL_CHECK(o.method == "weights" || o.method == "activations", "[moefy] method '", o.method,
            "' is unknown; expected weights or activations");
  MDL_CHECK(dc.intermediate_size % o.experts == 0, "[moefy] ", o.experts,
            " experts must divide the MLP width ", dc.intermediate_size);
  MDL_CHECK(o.method == "weights" || sample_ids.defined(),
            "[moefy] co-activation clustering needs sample token ids");
  torch::NoGradGuard no_grad;
  // The dense MLP inputs on the sample, per layer (for co-activations and the report).
  std::vector<at::Tensor> inputs;
  if (sample_ids.defined()) {
    std::vector<Site*> sites;
    for (int64_t l = 0; l < dc.n_layer; ++l)
      sites.push_back(&dense.site("model.layers." + std::to_string(l) + ".mlp"));
    SiteRecorder recorder(sites, {});  // the dense MLPs' own outputs: a plain dense pass
    ModelInput in;
    in.input_ids = sample_ids.to(dense.device());
    dense.forward(in);
    for (Site* site : sites)
      for (const auto& x : recorder.inputs(site->name()))
        inputs.push_back(x.reshape({-1, x.size(-1)}).to(at::kFloat));
  }
  ModelConfig c = mixtral_config(dc, o.experts, o.top_k);
  c.intermediate_size = dc.intermediate_size / o.experts;
  nlohmann::json router = {{"kind", "top_k"}, {"k", o.top_k}, {"unit_weights", true}};
  c.router_json = router.dump();
  Model m = create_model(c);
  m->to(dense.device(), dense.dtype());
  auto from = params(dense);
  auto to = params(*m);
  const int64_t E = o.experts, G = c.intermediate_size;
  if (report) report->kept.clear();
  for (int64_t l = 0; l < dc.n_layer; ++l) {
    const std::string p = "model.layers." + std::to_string(l);
    at::Tensor wg = from.at(p + ".mlp.gate_proj.weight").to(at::kFloat);  // (I, C)
    at::Tensor wu = from.at(p + ".mlp.up_proj.weight").to(at::kFloat);    // (I, C)
    at::Tensor wd = from.at(p + ".mlp.down_proj.weight").to(at::kFloat);  // (C, I)
    at::Tensor h;  // (N, I) intermediate activations on the sample
    if (!inputs.empty())
      h = fn::activation(at::matmul(inputs[l], wg.t()), dc.activation) * at::matmul(inputs[l], wu.t());
    at::Tensor features = o.method == "weights" ? wg : h.t();
    std::vector<int64_t> group =
        balanced_kmeans(features, E, o.iterations, o.seed + static_cast<uint64_t>(l));
    at::Tensor router = at::empty({E, dc.hidden_size});
    at::Tensor g = at::tensor(group, at::kLong);
    std::vector<at::Tensor> members;  // each group's neurons
    for (int64_t e = 0; e < E; ++e) {
      at::Tensor idx = (g == e).nonzero().reshape({-1});
      MDL_CHECK(idx.numel() == G, "[moefy] group ", e, " of layer ", l, " has ", idx.numel(),
                " neurons, expected ", G);
      const std::string ep = p + ".block_sparse_moe.experts." + std::to_string(e);
      to.at(ep + ".w1.weight").copy_(wg.index_select(0, idx));
      to.at(ep + ".w3.weight").copy_(wu.index_select(0, idx));
      to.at(ep + ".w2.weight").copy_(wd.index_select(1, idx));
      router[e] = wg.index_select(0, idx).mean(0);
      members.push_back(idx);
    }
    to.at(p + ".block_sparse_moe.gate.weight").copy_(router);
    if (report && h.defined()) {
      // The converted layer's own computation (its router, unit weights, grouped dispatch) on the sample.
      Routing r = make_router(nlohmann::json::parse(c.router_json).get<RouterOptions>())
                      ->route(at::matmul(inputs[l], router.t()), E, {});
      at::Tensor y = dispatch(inputs[l], r, dc.hidden_size, [&](int64_t e, const at::Tensor& rows) {
        const at::Tensor& idx = members[static_cast<size_t>(e)];
        at::Tensor a = fn::activation(at::matmul(rows, wg.index_select(0, idx).t()), dc.activation);
        return at::matmul(a * at::matmul(rows, wu.index_select(0, idx).t()), wd.index_select(1, idx).t());
      });
      at::Tensor y_dense = at::matmul(h, wd.t());
      report->kept.push_back(1.0 - (y_dense - y).pow(2).sum().item<double>() /
                                       y_dense.pow(2).sum().clamp_min(1e-30).item<double>());
    }
  }
  for (auto& [name, t] : to) {
    if (name.find(".block_sparse_moe.") != std::string::npos) continue;
    auto it = from.find(name);
    MDL_CHECK(it != from.end(), "[moefy] the dense model has no tensor '", name, "'");
    t.copy_(it->second);
  }
  return m;
}

}  // namespace mdl
