#include "mdl/core/site_recorder.h"

#include "mdl/core/error.h"

namespace mdl {

class SiteRecorder::Probe : public SiteFunction {
 public:
  explicit Probe(Options o) : options_(o) {}
  at::Tensor forward(const at::Tensor& input, const at::Tensor& base) override {
    if (options_.inputs) inputs.push_back(options_.detach ? input.detach() : input);
    if (options_.outputs) outputs.push_back(options_.detach ? base.detach() : base);
    return base;
  }
  std::vector<at::Tensor> inputs, outputs;

 private:
  Options options_;
};

SiteRecorder::SiteRecorder(const std::vector<Site*>& sites, Options options) {
  for (Site* site : sites) {
    MDL_CHECK(site != nullptr, "[site-recorder] a null site");
    auto& probe = probes_[site->name()];
    if (probe) continue;  // listed twice: recorded once
    probe = std::make_shared<Probe>(options);
    saved_.emplace_back(site, site->function());
    site->attach(probe);
  }
}

SiteRecorder::~SiteRecorder() {
  for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) it->first->attach(it->second);
}

const std::vector<at::Tensor>& SiteRecorder::inputs(const std::string& site) const {
  static const std::vector<at::Tensor> none;
  auto it = probes_.find(site);
  return it == probes_.end() ? none : it->second->inputs;
}

const std::vector<at::Tensor>& SiteRecorder::outputs(const std::string& site) const {
  static const std::vector<at::Tensor> none;
  auto it = probes_.find(site);
  return it == probes_.end() ? none : it->second->outputs;
}

void SiteRecorder::clear() {
  for (auto& [name, probe] : probes_) probe->inputs.clear(), probe->outputs.clear();
}

}  // namespace mdl
