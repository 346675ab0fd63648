#include "mdl/modules/hyper_lora.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/core/fields.h"

namespace mdl {

void to_json(nlohmann::json& j, const HyperLoraOptions& o) {
  j = hyper_lora_fields().write(o);
}

const FieldList<HyperLoraOptions>& hyper_lora_fields() {
  static const FieldList<HyperLoraOptions> f =
      FieldList<HyperLoraOptions>("hyper_lora")
          .add("num_tasks", &HyperLoraOptions::num_tasks, "learned task embeddings (task ids 0..num_tasks-1)")
          .add("task_embedding_dim", &HyperLoraOptions::task_embedding_dim, "width of a task embedding")
          .add("site_embedding_dim", &HyperLoraOptions::site_embedding_dim,
               "width of each targeted site's learned embedding")
          .add("hidden", &HyperLoraOptions::hidden, "the generator's hidden width")
          .add("r", &HyperLoraOptions::r, "rank of the generated LoRA")
          .add("lora_alpha", &HyperLoraOptions::alpha, "the generated LoRA's alpha (scaling alpha / r)")
          .check([](const HyperLoraOptions& o) { validate(o); });
  return f;
}

void validate(const HyperLoraOptions& o) {
  MDL_CHECK(
      o.num_tasks > 0 && o.task_embedding_dim > 0 && o.site_embedding_dim > 0 && o.hidden > 0 && o.r > 0,
      "[hyper_lora] num_tasks, task_embedding_dim, site_embedding_dim, hidden and r must be > 0");
}

void from_json(const nlohmann::json& j, HyperLoraOptions& o) {
  o = hyper_lora_fields().read(j);
}

static std::string shape_key(const SiteInfo& s) {
  return std::to_string(s.in_features) + "x" + std::to_string(s.out_features);
}

HyperGeneratorImpl::HyperGeneratorImpl(const HyperLoraOptions& o, const std::vector<SiteInfo>& sites,
                                       uint64_t seed, c10::TensorOptions dtype)
    : options(o), sites_(sites) {
  auto gen = at::detail::createCPUGenerator(seed);
  auto uni = [&](std::vector<int64_t> shape, double b) {
    return at::empty(shape).uniform_(-b, b, gen).to(dtype);
  };
  task_embeddings = register_parameter(
      "task_embeddings", at::empty({o.num_tasks, o.task_embedding_dim}).normal_(0, 1, gen).to(dtype));
  site_embeddings = register_parameter(
      "site_embeddings",
      at::empty({int64_t(sites.size()), o.site_embedding_dim}).normal_(0, 1, gen).to(dtype));
  const int64_t in = o.task_embedding_dim + o.site_embedding_dim;
  w1 = register_parameter("trunk_weight", uni({o.hidden, in}, 1.0 / std::sqrt(double(in))));
  b1 = register_parameter("trunk_bias", at::zeros({o.hidden}, dtype));
  const double bh = 1.0 / std::sqrt(double(o.hidden));
  for (const auto& s : sites) {
    const std::string key = shape_key(s);
    if (head_a.count(key)) continue;
    head_a[key] = {register_parameter("head_A_" + key + "_weight", uni({o.r * s.in_features, o.hidden}, bh)),
                   register_parameter("head_A_" + key + "_bias", at::zeros({o.r * s.in_features}, dtype))};
    // B's head starts at zero: a new generated LoRA leaves the model unchanged.
    head_b[key] = {
        register_parameter("head_B_" + key + "_weight", at::zeros({s.out_features * o.r, o.hidden}, dtype)),
        register_parameter("head_B_" + key + "_bias", at::zeros({s.out_features * o.r}, dtype))};
  }
}

std::pair<at::Tensor, at::Tensor> HyperGeneratorImpl::generate(const at::Tensor& task, int64_t index) const {
  const SiteInfo& s = sites_.at(static_cast<size_t>(index));
  at::Tensor z = at::cat({task, site_embeddings[index]});  // (te + se)
  at::Tensor h = at::relu(at::linear(z, w1, b1));          // (hidden)
  const auto& [wa, ba] = head_a.at(shape_key(s));
  const auto& [wb, bb] = head_b.at(shape_key(s));
  at::Tensor A = at::linear(h, wa, ba).view({options.r, s.in_features});   // (r, in)
  at::Tensor B = at::linear(h, wb, bb).view({s.out_features, options.r});  // (out, r)
  return {A, B};
}

at::Tensor HyperGeneratorImpl::current_task() const {
  return explicit_task_.defined() ? explicit_task_ : task_embeddings[task_];
}

void HyperGeneratorImpl::set_task(int64_t task) {
  MDL_CHECK(task >= 0 && task < options.num_tasks, "[hyper_lora] task ", task, " is not in [0, ",
            options.num_tasks, ")");
  task_ = task;
  explicit_task_ = at::Tensor();
}

void HyperGeneratorImpl::set_task_embedding(const at::Tensor& embedding) {
  MDL_CHECK(embedding.dim() == 1 && embedding.size(0) == options.task_embedding_dim,
            "[hyper_lora] a task embedding has ", options.task_embedding_dim, " values, got shape ",
            embedding.sizes());
  explicit_task_ = embedding.to(task_embeddings.options());
}

HyperLoraImpl::HyperLoraImpl(const SiteInfo& site, int64_t index,
                             std::shared_ptr<HyperGeneratorImpl> generator, bool owner)
    : index_(index), generator_(std::move(generator)) {
  MDL_CHECK(site.kind == SiteKind::linear, "[hyper_lora] '", site.name, "' is not a linear site");
  if (owner) register_module("generator", generator_);
}

at::Tensor HyperLoraImpl::forward(const at::Tensor& input, const at::Tensor& current) {
  auto [A, B] = generator_->generate(generator_->current_task(), index_);
  const double scaling = generator_->options.alpha / static_cast<double>(generator_->options.r);
  return current + at::linear(at::linear(input, A), B) * scaling;
}

}  // namespace mdl
