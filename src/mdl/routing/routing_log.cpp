#include "mdl/routing/routing_log.h"

#include <ATen/ATen.h>

#include <cstdio>

#include "mdl/core/error.h"

namespace mdl {

at::Tensor load_balancing_loss(const at::Tensor& probs, const at::Tensor& chosen) {
  const int64_t N = probs.size(0), E = probs.size(1);
  at::Tensor f = chosen.to(probs.scalar_type()) / static_cast<double>(N);  // (E)
  return static_cast<double>(E) * (f * probs.mean(0)).sum();
}

at::Tensor router_z_loss(const at::Tensor& logits) {
  return at::logsumexp(logits.to(at::kFloat), -1).pow(2).mean();
}

namespace {
/// Entropy (nats) of distributions along the last dimension; eps inside the log as ModuleFormer's code.
at::Tensor entropy(const at::Tensor& p) {
  return -(p * (p + 1e-8).log()).sum(-1);
}
}  // namespace

at::Tensor usage_entropy(const at::Tensor& probs) {
  MDL_CHECK(probs.dim() == 2, "[routing] router probabilities must be (N, E), got ", probs.sizes());
  return entropy(probs.to(at::kFloat).mean(0));
}

at::Tensor mutual_information_loss(const at::Tensor& probs) {
  MDL_CHECK(probs.dim() == 2, "[routing] router probabilities must be (N, E), got ", probs.sizes());
  const at::Tensor p = probs.to(at::kFloat);
  return entropy(p).mean() - entropy(p.mean(0));
}

double routing_entropy(const at::Tensor& probs) {
  at::Tensor p = probs.detach().to(at::kDouble);
  return -(p * p.clamp_min(1e-30).log()).sum(-1).mean().item<double>();
}

std::vector<double> expert_load(const Routing& r) {
  std::vector<double> load(static_cast<size_t>(r.experts), 0.0);
  if (!r.expert.defined() || r.expert.numel() == 0) return load;
  // A dense routing's load is each expert's share of the weight; a sparse one's its share of assignments.
  at::Tensor counts = r.dense.defined() ? r.dense.detach().to(at::kCPU, at::kDouble).sum(0)
                                        : at::bincount(r.expert.to(at::kCPU), {}, r.experts).to(at::kDouble);
  counts = counts / counts.sum();
  for (int64_t e = 0; e < r.experts; ++e) load[e] = counts[e].item<double>();
  return load;
}

void RoutingLog::record(const std::string& site, const Routing& r, const RouterOptions& options) {
  RoutingStats s;
  s.site = site;
  s.rows = r.rows;
  s.load = expert_load(r);
  s.dropped_fraction = r.requested ? static_cast<double>(r.dropped) / r.requested : 0.0;
  if (keep_weights_) s.weights = (r.probs.defined() ? r.probs : r.dense_weights()).detach().to(at::kCPU);
  if (r.probs.defined()) {
    s.entropy = routing_entropy(r.probs);
    at::Tensor lb = load_balancing_loss(r.probs, r.chosen);
    at::Tensor z = router_z_loss(r.logits);
    s.load_balancing = lb.item<double>();
    s.z_loss = z.item<double>();
    const at::Tensor usage = usage_entropy(r.probs);
    s.usage_entropy = usage.item<double>();
    at::Tensor weighted = lb * options.load_balancing_coef + z * options.z_loss_coef;
    if (options.mi_loss_coef != 0)
      weighted = weighted + mutual_information_loss(r.probs) * options.mi_loss_coef;
    if (options.concentration_coef != 0) weighted = weighted + usage * options.concentration_coef;
    if (options.load_balancing_coef != 0 || options.z_loss_coef != 0 || options.mi_loss_coef != 0 ||
        options.concentration_coef != 0)
      aux_ = aux_.defined() ? aux_ + weighted : weighted;
  }
  stats_.push_back(std::move(s));
}

at::Tensor RoutingLog::aux_loss() const {
  return aux_.defined() ? aux_ : at::zeros({});
}

const Routing* RoutingLog::shared(const std::string& key) const {
  auto it = shared_.find(key);
  return it == shared_.end() ? nullptr : &it->second;
}

void RoutingLog::clear() {
  stats_.clear();
  aux_ = at::Tensor();
  shared_.clear();
}

std::string RoutingLog::to_string() const {
  std::string out =
      "site                                      rows  H(e|x)    H(e)  dropped  lb_loss  z_loss  load per "
      "expert\n";
  char buf[512];
  for (const auto& s : stats_) {
    std::snprintf(buf, sizeof(buf), "%-40s %6lld  %6.3f  %6.3f  %6.1f%%  %7.4f  %6.3f ", s.site.c_str(),
                  static_cast<long long>(s.rows), s.entropy, s.usage_entropy, 100.0 * s.dropped_fraction,
                  s.load_balancing, s.z_loss);
    out += buf;
    for (double l : s.load) {
      std::snprintf(buf, sizeof(buf), " %.2f", l);
      out += buf;
    }
    out += "\n";
  }
  return out;
}

}  // namespace mdl
