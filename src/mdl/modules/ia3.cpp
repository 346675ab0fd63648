#include "mdl/modules/ia3.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/core/fields.h"

namespace mdl {

void to_json(nlohmann::json& j, const Ia3Options& o) {
  j = ia3_fields().write(o);
}

const FieldList<Ia3Options>& ia3_fields() {
  static const FieldList<Ia3Options> f =
      FieldList<Ia3Options>("ia3")
          .add(
              "feedforward_modules",
              [](nlohmann::json& v, const Ia3Options& o) { v = o.feedforward_modules; },
              [](const nlohmann::json& v, Ia3Options& o) {
                if (v.is_array()) o.feedforward_modules = v.get<std::vector<std::string>>();
              },
              "site suffixes whose input is scaled (feed-forward); elsewhere the output is")
          .add("init_ia3_weights", &Ia3Options::init_ones,
               "start at ones (identity); false draws N(1, 0.1) (tests)");
  return f;
}

void from_json(const nlohmann::json& j, Ia3Options& o) {
  o = ia3_fields().read(j);
}

bool Ia3Options::is_feedforward(const std::string& site) const {
  for (const auto& s : feedforward_modules)
    if (site == s || (site.size() > s.size() && site.compare(site.size() - s.size(), s.size(), s) == 0 &&
                      site[site.size() - s.size() - 1] == '.'))
      return true;
  return false;
}

Ia3Impl::Ia3Impl(SiteLinearImpl& base, const Ia3Options& o, uint64_t seed) : base_(&base) {
  const SiteInfo& info = base.site()->info();
  MDL_CHECK(info.kind == SiteKind::linear, "[ia3] '", info.name, "' is not a linear site");
  feedforward = o.is_feedforward(info.name);
  std::vector<int64_t> shape =
      feedforward ? std::vector<int64_t>{1, info.in_features} : std::vector<int64_t>{info.out_features, 1};
  at::Tensor init = at::ones(shape);
  if (!o.init_ones) init.normal_(1.0, 0.1, at::detail::createCPUGenerator(seed));
  ia3_l = register_parameter("ia3_l", init.to(base.weight.options()));
}

at::Tensor Ia3Impl::forward(const at::Tensor& input, const at::Tensor& current) {
  if (feedforward) return current + at::linear(input * (ia3_l.view(-1) - 1), base_->weight);  // W (l x) + b
  return current * ia3_l.view(-1);                                                            // (W x + b) l
}

void Ia3Impl::merge() {
  torch::NoGradGuard g;
  SiteLinearImpl& base = *base_;
  if (feedforward) {
    base.weight.mul_(ia3_l);  // scales columns (in)
  } else {
    base.weight.mul_(ia3_l);  // (out, 1) scales rows
    if (base.bias.defined()) base.bias.mul_(ia3_l.view(-1));
  }
}

void Ia3Impl::unmerge() {
  torch::NoGradGuard g;
  SiteLinearImpl& base = *base_;
  MDL_CHECK(ia3_l.abs().min().item<double>() > 1e-8, "[ia3] cannot unmerge at '", base.site()->name(),
            "': a scaling entry is zero");
  base.weight.div_(ia3_l);
  if (!feedforward && base.bias.defined()) base.bias.div_(ia3_l.view(-1));
}

}  // namespace mdl
