#include "mdl/modules/module_group.h"

#include <ATen/ATen.h>

#include "mdl/core/error.h"

namespace mdl {

GroupMembers module_members(const std::vector<std::shared_ptr<SiteModule>>& modules, int64_t out_features,
                            const std::string& site) {
  GroupMembers m;
  m.count = static_cast<int64_t>(modules.size());
  m.out_features = out_features;
  m.change = [modules, site](int64_t e, const at::Tensor& x, const at::Tensor& current) {
    const auto& module = modules[static_cast<size_t>(e)];
    at::Tensor next = module->forward(x, current);
    MDL_CHECK(next.sizes() == current.sizes(), "[group] at '", site, "': member ", e, " (", module->type(),
              ") changes the output's shape (", current.sizes(), " -> ", next.sizes(),
              "); only same-shape modules "
              "combine");
    return next - current;
  };
  m.stacked_low_rank = [modules](at::Tensor& A, at::Tensor& B, double& scaling) {
    std::vector<at::Tensor> as, bs;
    for (size_t e = 0; e < modules.size(); ++e) {
      at::Tensor a, b;
      double s = 0;
      if (!modules[e]->low_rank(a, b, s)) return false;
      if (e > 0 && (a.sizes() != as[0].sizes() || b.sizes() != bs[0].sizes() || s != scaling)) return false;
      scaling = s;
      as.push_back(a);
      bs.push_back(b);
    }
    A = at::stack(as);
    B = at::stack(bs);
    return true;
  };
  return m;
}

GroupMembers stacked_lora_members(const at::Tensor& A, const at::Tensor& B, double scaling) {
  GroupMembers m;
  m.count = A.size(0);
  m.out_features = B.size(1);
  m.reads_current = false;
  m.change = [A, B, scaling](int64_t e, const at::Tensor& x, const at::Tensor&) {
    return at::matmul(at::matmul(x.to(A.scalar_type()), A[e].t()), B[e].t()) * scaling;
  };
  m.stacked_low_rank = [A, B, scaling](at::Tensor& a, at::Tensor& b, double& s) {
    a = A;
    b = B;
    s = scaling;
    return true;
  };
  return m;
}

ModuleGroupImpl::ModuleGroupImpl(std::string type, const SiteInfo& site, GroupMembers members,
                                 std::vector<const SiteModule*> absorbed, std::shared_ptr<GroupRouter> router,
                                 std::shared_ptr<Aggregator> aggregator)
    : type_(std::move(type)),
      site_(site),
      members_(std::move(members)),
      absorbed_(std::move(absorbed)),
      router_(std::move(router)),
      aggregator_(std::move(aggregator)) {
  MDL_CHECK(members_.count >= 1, "[group] '", site_.name, "': a ", type_, " needs at least one member");
  MDL_CHECK(router_ || !aggregator_->uses_routing(), "[group] '", site_.name, "': a ", type_, "'s ",
            aggregator_->kind(), " reads a routing, so it needs a router");
  if (router_) router_->register_parameters(*this);
  aggregator_->register_parameters(*this);
}

at::Tensor ModuleGroupImpl::forward(const at::Tensor& input, const at::Tensor& current) {
  MDL_CHECK(input.dim() == 3 || input.dim() == 2, "[group] a ", type_, " at '", site_.name,
            "' expects (B, T, in) or ", "(B, in) inputs, got ", input.sizes());
  if (input.dim() == 2)
    return forward(input.unsqueeze(1), current.unsqueeze(1)).squeeze(1);  // a head on pooled rows
  const Routing routing = router_ ? router_->route(input, members_.count, is_training())  // route
                                  : Routing();  // the aggregator weighs every member itself
  at::Tensor change = aggregator_->combine(input, current, routing, members_);  // compute and aggregate
  return current + change.to(current.scalar_type());
}

}  // namespace mdl
