#include "mdl/backbones/moduleformer_experts.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/utils.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <numeric>
#include <string>

#include "mdl/core/error.h"
#include "mdl/routing/gates.h"
#include "mdl/routing/routing_log.h"

namespace mdl {
namespace {

using Tensors = std::map<std::string, at::Tensor>;

void check_moduleformer(const ModelConfig& c, const char* where) {
  MDL_CHECK(c.arch == Arch::moduleformer, "[", where, "] experts are added to and pruned from ModuleFormer ",
            "models; this is a ", c.architecture, " (for Mixtral-style models see mdl upcycle)");
}

/// One mixture of one layer: its tensor-name prefix and the tensors whose dimension 0 is its experts.
struct Mixture {
  std::string prefix;
  std::vector<std::string> rows;  // full names
};

std::vector<Mixture> mixtures(const ModelConfig& c, int layer, bool attention) {
  const std::string p = "transformer.h." + std::to_string(layer) + (attention ? ".attn.q_proj" : ".mlpf");
  Mixture m{p, {p + ".experts.weight", p + ".output_experts.weight"}};
  for (const auto& r : GateImpl::expert_rows(c.gate_type, false)) m.rows.push_back(p + ".gate." + r);
  return {m};
}

/// A model of `config` holding `tensors` (by parameter name), on `like`'s device and dtype.
Model rebuild(const ModelConfig& config, const Tensors& tensors, const ModelImpl& like) {
  Model m = create_model(config);
  torch::NoGradGuard no_grad;
  for (auto& item : m->named_parameters(/*recurse=*/true)) {
    auto it = tensors.find(item.key());
    MDL_CHECK(it != tensors.end(), "[experts] no tensor for '", item.key(), "'");
    MDL_CHECK(it->second.sizes() == item.value().sizes(), "[experts] '", item.key(), "' is ",
              it->second.sizes(), ", the new model expects ", item.value().sizes());
    item.value().set_data(it->second.detach().clone());
  }
  m->to(like.device(), like.dtype());
  m->train(like.is_training());
  return m;
}

Tensors parameters_of(const ModelImpl& model) {
  Tensors t;
  for (const auto& item : model.named_parameters(/*recurse=*/true)) t[item.key()] = item.value().detach();
  return t;
}

ModelConfig with_json(ModelConfig c, const std::function<void(nlohmann::json&)>& edit) {
  nlohmann::json j = nlohmann::json::parse(model_config_to_json(c));
  edit(j);
  return parse_model_config(j.dump(), "the edited config of " + c.architecture);
}

}  // namespace

Model add_experts(const ModelImpl& model, ExpertCounts add, uint64_t seed) {
  const ModelConfig& c = model.config();
  check_moduleformer(c, "experts add");
  MDL_CHECK(add.attention >= 0 && add.mlp >= 0 && add.attention + add.mlp > 0,
            "[experts add] give a number of attention or MLP experts to add (> 0), got attention ",
            add.attention, ", mlp ", add.mlp);
  auto gen = at::detail::createCPUGenerator(seed);
  Tensors t = parameters_of(model);
  for (int l = 0; l < c.n_layer; ++l)
    for (bool attention : {true, false}) {
      const int64_t n = attention ? add.attention : add.mlp;
      if (n == 0) continue;
      for (const auto& m : mixtures(c, l, attention))
        for (const auto& name : m.rows) {
          at::Tensor& old = t.at(name);
          auto shape = old.sizes().vec();
          shape[0] = n;
          const double std = name.find("expert_centroids") != std::string::npos ? 1.0 : c.initializer_range;
          const at::Tensor fresh =
              at::empty(shape).normal_(0.0, std, gen).to(old.device(), old.scalar_type());
          old = at::cat({old, fresh}, 0);
        }
    }
  const ExpertCounts before = frozen_experts(c);
  ModelConfig grown = with_json(c, [&](nlohmann::json& j) {
    j["n_att_experts"] = c.num_att_experts + add.attention;
    j["n_mlp_experts"] = c.num_experts + add.mlp;
    // Frozen: what the model had before its first addition since training (a second add keeps the first
    // count unless the experts since then were trained and the config rewritten).
    j["mdl_frozen_experts"] = {{"attention", before.attention > 0 ? before.attention : c.num_att_experts},
                               {"mlp", before.mlp > 0 ? before.mlp : c.num_experts}};
  });
  return rebuild(grown, t, model);
}

Model keep_experts(const ModelImpl& model, const std::vector<std::vector<int64_t>>& attention,
                   const std::vector<std::vector<int64_t>>& mlp) {
  const ModelConfig& c = model.config();
  check_moduleformer(c, "experts prune");
  Tensors t = parameters_of(model);
  auto count = [&](const std::vector<std::vector<int64_t>>& keep, int64_t all, const char* what) -> int64_t {
    if (keep.empty()) return all;
    MDL_CHECK(static_cast<int64_t>(keep.size()) == c.n_layer, "[experts prune] ", what,
              ": a list per layer (", c.n_layer, "), got ", keep.size());
    for (size_t l = 0; l < keep.size(); ++l) {
      MDL_CHECK(keep[l].size() == keep[0].size() && !keep[l].empty(), "[experts prune] ", what,
                ": every layer keeps the same number (>= 1) of experts; layer ", l, " keeps ", keep[l].size(),
                ", layer 0 ", keep[0].size());
      for (int64_t e : keep[l])
        MDL_CHECK(e >= 0 && e < all, "[experts prune] ", what, ": layer ", l, " keeps expert ", e, " of ",
                  all);
    }
    return static_cast<int64_t>(keep[0].size());
  };
  const int64_t na = count(attention, c.num_att_experts, "attention"), nm = count(mlp, c.num_experts, "mlp");
  for (int l = 0; l < c.n_layer; ++l)
    for (bool att : {true, false}) {
      const auto& keep = att ? attention : mlp;
      if (keep.empty()) continue;
      for (const auto& m : mixtures(c, l, att))
        for (const auto& name : m.rows) {
          at::Tensor& w = t.at(name);
          w = w.index_select(0, at::tensor(keep[static_cast<size_t>(l)], at::kLong).to(w.device()));
        }
    }
  ModelConfig pruned = with_json(c, [&](nlohmann::json& j) {
    j["n_att_experts"] = na;
    j["n_mlp_experts"] = nm;
    j["k_att"] = std::min(c.att_experts_per_token, na);
    j["k_mlp"] = std::min(c.experts_per_token, nm);
    j["sample_topk"] = std::min({c.sample_topk, j["k_att"].get<int64_t>(), j["k_mlp"].get<int64_t>()});
    j.erase("mdl_frozen_experts");  // the indices changed
  });
  return rebuild(pruned, t, model);
}

ExpertUsageMeter::ExpertUsageMeter(const ModelConfig& c)
    : attention_(static_cast<size_t>(c.n_layer),
                 std::vector<double>(static_cast<size_t>(c.num_att_experts), 0.0)),
      mlp_(static_cast<size_t>(c.n_layer), std::vector<double>(static_cast<size_t>(c.num_experts), 0.0)) {
  check_moduleformer(c, "experts usage");
}

void ExpertUsageMeter::add(const RoutingLog& log) {
  for (const auto& s : log.stats()) {
    // "transformer.h.<l>.attn" or "transformer.h.<l>.mlpf"
    const std::string head = "transformer.h.";
    if (s.site.rfind(head, 0) != 0) continue;
    const size_t dot = s.site.find('.', head.size());
    if (dot == std::string::npos) continue;
    const size_t layer = std::stoul(s.site.substr(head.size(), dot - head.size()));
    const std::string kind = s.site.substr(dot + 1);
    auto& table = kind == "attn" ? attention_ : mlp_;
    if ((kind != "attn" && kind != "mlpf") || layer >= table.size() || s.load.size() != table[layer].size())
      continue;
    for (size_t e = 0; e < s.load.size(); ++e) table[layer][e] += s.load[e] * static_cast<double>(s.rows);
  }
}

ExpertUsage ExpertUsageMeter::usage() const {
  auto normalise = [](std::vector<std::vector<double>> t) {
    for (auto& row : t) {
      const double sum = std::accumulate(row.begin(), row.end(), 0.0);
      if (sum > 0)
        for (double& x : row) x /= sum;
    }
    return t;
  };
  return {normalise(attention_), normalise(mlp_)};
}

std::vector<std::vector<int64_t>> most_used(const std::vector<std::vector<double>>& usage, int64_t keep) {
  std::vector<std::vector<int64_t>> out;
  for (const auto& row : usage) {
    MDL_CHECK(keep >= 1 && keep <= static_cast<int64_t>(row.size()), "[experts prune] --keep ", keep,
              " must be in 1..", row.size(), " (the experts of a layer)");
    std::vector<int64_t> order(row.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return row[a] > row[b]; });
    order.resize(static_cast<size_t>(keep));
    std::sort(order.begin(), order.end());
    out.push_back(order);
  }
  return out;
}

ExpertCounts frozen_experts(const ModelConfig& c) {
  if (c.raw_json.empty()) return {};
  const nlohmann::json j = nlohmann::json::parse(c.raw_json);
  if (!j.contains("mdl_frozen_experts")) return {};
  const auto& f = j["mdl_frozen_experts"];
  MDL_CHECK(f.is_object() && f.value("attention", -1) >= 0 && f.value("mlp", -1) >= 0,
            "[config] 'mdl_frozen_experts' must be {\"attention\": n, \"mlp\": n}, found ", f.dump());
  return {f["attention"].get<int64_t>(), f["mlp"].get<int64_t>()};
}

std::vector<ExpertSlice> new_expert_slices(ModelImpl& model) {
  const ModelConfig& c = model.config();
  check_moduleformer(c, "train");
  const ExpertCounts frozen = frozen_experts(c);
  MDL_CHECK(frozen.attention > 0 || frozen.mlp > 0,
            "[train] options.freeze_old_experts: the model has no added experts (its config has no "
            "mdl_frozen_experts); add some with mdl experts add first");
  auto params = model.named_parameters(/*recurse=*/true);
  std::vector<ExpertSlice> out;
  for (int l = 0; l < c.n_layer; ++l)
    for (bool att : {true, false}) {
      const int64_t old = att ? frozen.attention : frozen.mlp, all = att ? c.num_att_experts : c.num_experts;
      if (old >= all) continue;  // nothing new in this mixture
      for (const auto& m : mixtures(c, l, att))
        for (const auto& name : m.rows) out.push_back({params[name], old});
    }
  return out;
}

}  // namespace mdl
