#include "mdl/core/rebuild.h"

#include <torch/csrc/autograd/custom_function.h>

#include <mutex>
#include <typeindex>
#include <unordered_map>

#include "mdl/core/error.h"

namespace mdl {
namespace {

constexpr const char* kKey = "mdl_input_rebuild";

struct Registry {
  std::mutex mutex;
  std::unordered_map<std::type_index, RebuildFn> fns;
};

Registry& registry() {
  static Registry r;
  return r;
}

}  // namespace

void register_rebuild(const std::type_info& node_type, RebuildFn fn) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.fns[std::type_index(node_type)] = fn;
}

Rebuild::Rebuild(std::shared_ptr<torch::autograd::Node> producer, RebuildFn fn, std::vector<int64_t> sizes)
    : producer_(std::move(producer)), fn_(fn), sizes_(std::move(sizes)) {}

at::Tensor Rebuild::operator()() const {
  at::Tensor y = fn_(*producer_);
  MDL_CHECK(y.sizes().vec() == sizes_, "[rebuild] ", producer_->name(), " rebuilt a ",
            shape_str(y.sizes().vec()), " tensor where the forward pass made ", shape_str(sizes_),
            "; a bug in its rebuild function");
  return y;
}

c10::intrusive_ptr<Rebuild> rebuild_of(const at::Tensor& y) {
  if (!y.defined() || y.is_view() || y.output_nr() != 0) return {};
  std::shared_ptr<torch::autograd::Node> node = y.grad_fn();
  if (!node) return {};
  RebuildFn fn = nullptr;
  {
    Registry& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.fns.find(std::type_index(typeid(*node)));
    if (it == r.fns.end()) return {};
    fn = it->second;
  }
  return c10::make_intrusive<Rebuild>(std::move(node), fn, y.sizes().vec());
}

at::Tensor save_input(torch::autograd::AutogradContext* ctx, const at::Tensor& x) {
  c10::intrusive_ptr<Rebuild> r = rebuild_of(x);
  if (!r) return x;
  MDL_CHECK(ctx->saved_data.count(kKey) == 0,
            "[rebuild] save_input was called twice on one node; it keeps one input's Rebuild");
  ctx->saved_data[kKey] = c10::IValue::make_capsule(std::move(r));
  return at::Tensor();
}

at::Tensor saved_input(torch::autograd::AutogradContext* ctx, const at::Tensor& saved) {
  if (saved.defined()) return saved;
  auto it = ctx->saved_data.find(kKey);
  MDL_CHECK(it != ctx->saved_data.end(), "[rebuild] the node kept neither its input nor a way to rebuild it");
  return (*static_cast<const Rebuild*>(it->second.toCapsule().get()))();
}

}  // namespace mdl
