#include "mdl/backbones/model.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/irange.h>

#include <cctype>
#include <cmath>
#include <cstring>
#include <filesystem>

#include "mdl/backbones/activation_checkpoint.h"
#include "mdl/backbones/bert.h"
#include "mdl/backbones/gpt2.h"
#include "mdl/backbones/llama.h"
#include "mdl/backbones/moduleformer.h"
#include "mdl/backbones/vit.h"
#include "mdl/core/error.h"
#include "mdl/core/forward_context.h"
#include "mdl/core/log.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/checkpoint.h"
#include "mdl/ops/fused_ops.h"

namespace mdl {
namespace {

bool starts_with(const std::string& s, const std::string& p) {
  return s.rfind(p, 0) == 0;
}
bool ends_with(const std::string& s, const std::string& p) {
  return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}

// Tensors HF checkpoints carry that are buffers, not parameters.
bool is_known_buffer(const std::string& name) {
  return ends_with(name, ".attn.bias") || ends_with(name, ".attn.masked_bias") ||
         ends_with(name, ".attn.mask") || ends_with(name, ".attn.cum_weight") ||  // ModuleFormer
         ends_with(name, "rotary_emb.inv_freq") || ends_with(name, "embeddings.position_ids");
}

}  // namespace

std::pair<at::Tensor, at::Tensor> KVCache::append(int layer, const at::Tensor& new_k,
                                                  const at::Tensor& new_v) {
  if (static_cast<int>(k.size()) <= layer) k.resize(layer + 1), v.resize(layer + 1);
  if (!k[layer].defined()) {
    k[layer] = new_k;
    v[layer] = new_v;
  } else {
    k[layer] = at::cat({k[layer], new_k}, 2);  // (B, Hkv, S, D)
    v[layer] = at::cat({v[layer], new_v}, 2);
  }
  return {k[layer], v[layer]};
}

ModelImpl::ModelImpl(ModelConfig config) : config_(std::move(config)) {}

std::shared_ptr<torch::nn::Module> ModelImpl::add_container(torch::nn::Module& parent,
                                                            const std::string& name) {
  return parent.register_module(name, std::make_shared<torch::nn::Module>(name));
}

SiteLinear ModelImpl::add_linear(torch::nn::Module& parent, const std::string& local, const std::string& full,
                                 int64_t in, int64_t out, bool bias, int layer, bool conv1d) {
  SiteLinear linear(SiteInfo{full, SiteKind::linear, in, out, layer}, bias);
  parent.register_module(local, linear);
  register_site(linear->site());
  linears_[full] = linear.get();
  if (conv1d) conv1d_.insert(full + ".weight");
  return linear;
}

Norm ModelImpl::add_norm(torch::nn::Module& parent, const std::string& local, const std::string& full,
                         NormImpl::Kind kind, int64_t dim, double eps, int layer) {
  Norm norm(kind, dim, eps, SiteInfo{full, SiteKind::norm, dim, dim, layer});
  parent.register_module(local, norm);
  register_site(norm->site());
  norms_[full] = norm.get();
  return norm;
}

NormImpl& ModelImpl::norm(const std::string& name) const {
  auto it = norms_.find(name);
  if (it == norms_.end()) {
    site(name);
    MDL_FAIL("[model] site '", name, "' is not a norm");
  }
  return *it->second;
}

at::Tensor ModelImpl::positions(const ModelInput& in, int64_t batch, int64_t past, int64_t length) const {
  const int64_t shift = kv_prefix_positions();
  if (in.position_ids.defined()) return shift ? in.position_ids + shift : in.position_ids;
  auto opts = in.input_ids.options().dtype(at::kLong);
  return at::arange(shift + past, shift + past + length, opts).expand({batch, length});  // (B, T)
}

int64_t ModelImpl::kv_prefix_positions() const {
  for (const auto& s : sites_)
    if (s->info().kind == SiteKind::attention_kv) return s->prefix_positions();
  return 0;
}

int64_t ModelImpl::apply_kv_site(const Site& site, at::Tensor& k, at::Tensor& v, at::Tensor& bias) const {
  if (site.empty()) return 0;
  at::Tensor kv = site.apply(k, at::stack({k, v}));  // (2, B, Hkv, n + S, D)
  const int64_t n = kv.size(3) - k.size(2);
  MDL_CHECK(n >= 0 && kv.size(0) == 2, "[model] the function at '", site.name(), "' returned ", kv.sizes(),
            " for keys ", k.sizes(), "; it may only prepend positions");
  k = kv[0];
  v = kv[1];
  if (n > 0 && bias.defined()) {  // prefix positions are visible to every query
    auto sizes = bias.sizes().vec();
    sizes.back() = n;
    bias = at::cat({at::zeros(sizes, bias.options()), bias}, -1);
  }
  return n;
}

std::shared_ptr<Site> ModelImpl::add_site(SiteInfo info) {
  register_site(std::make_shared<Site>(std::move(info)));
  return sites_.back();
}

void ModelImpl::register_site(std::shared_ptr<Site> site) {
  MDL_CHECK(site_index_.emplace(site->name(), site.get()).second, "[model] two sites named '", site->name(),
            "'");
  sites_.push_back(std::move(site));
}

void ModelImpl::build_head(const Embedding& token_embedding) {
  if (!token_embedding.is_empty()) token_embeddings_ = token_embedding->weight;
  const int64_t C = config_.hidden_size;
  const bool bert = config_.arch == Arch::bert;
  switch (config_.head) {
    case HeadKind::causal_lm: {
      at::Tensor tied = config_.tie_word_embeddings ? token_embedding->weight : at::Tensor();
      lm_head_ = SiteLinear(SiteInfo{"lm_head", SiteKind::linear, C, config_.vocab_size, -1}, false, tied);
      register_module("lm_head", lm_head_);
      register_site(lm_head_->site());
      linears_["lm_head"] = lm_head_.get();
      break;
    }
    case HeadKind::sequence_classification:
      if (bert) {
        auto body = named_children()[config_.body_prefix()];
        auto pooler = add_container(*body, "pooler");
        pooler_ = add_linear(*pooler, "dense", "bert.pooler.dense", C, C, true, -1);
        classifier_ = add_linear(*this, "classifier", "classifier", C, config_.num_labels, true, -1);
      } else if (config_.arch == Arch::vit) {
        classifier_ = add_linear(*this, "classifier", "classifier", C, config_.num_labels, true, -1);
      } else {
        classifier_ = add_linear(*this, "score", "score", C, config_.num_labels, false, -1);
      }
      break;
    case HeadKind::token_classification: {
      const std::string name = config_.arch == Arch::llama ? "score" : "classifier";
      classifier_ = add_linear(*this, name, name, C, config_.num_labels, true, -1);
      break;
    }
    case HeadKind::none:
      if (bert) {
        auto body = named_children()[config_.body_prefix()];
        auto pooler = add_container(*body, "pooler");
        pooler_ = add_linear(*pooler, "dense", "bert.pooler.dense", C, C, true, -1);
      }
      break;
  }
}

void ModelImpl::train(bool on) {
  torch::nn::Module::train(on);
  for (const auto& site : sites_)
    if (site->function()) site->function()->set_training(on);
}

Site* ModelImpl::find_site(const std::string& name) const {
  auto it = site_index_.find(name);
  return it == site_index_.end() ? nullptr : it->second;
}

Site& ModelImpl::site(const std::string& name) const {
  if (Site* s = find_site(name)) return *s;
  std::string some;
  for (size_t i = 0; i < sites_.size() && i < 4; ++i) some += (i ? ", " : "") + sites_[i]->name();
  MDL_FAIL("[model] no site '", name, "' in this ", config_.architecture, "; sites are named like ", some);
}

SiteLinearImpl& ModelImpl::linear(const std::string& name) const {
  auto it = linears_.find(name);
  if (it == linears_.end()) {
    site(name);  // throws "no site" with examples if the name is unknown
    MDL_FAIL("[model] site '", name, "' is not a linear projection");
  }
  return *it->second;
}

void ModelImpl::set_router(const RouterOptions&) {
  MDL_FAIL("[model] ", config_.architecture,
           " is dense: it has no mixture-of-experts layers to route; upcycle it "
           "first (mdl upcycle) or attach lora_moe modules");
}

namespace {

ForwardContext context_of(const ModelInput& in, bool causal) {
  ForwardContext context;
  context.past = in.cache ? in.cache->length() : 0;
  context.causal = causal;
  context.input_ids = &in.input_ids;
  context.routing = in.routing;
  context.routing_log = in.routing_log;
  return context;
}

}  // namespace

at::Tensor ModelImpl::forward(const ModelInput& in) {
  const ForwardContext context = context_of(in, config_.is_decoder());  // the guard points at it
  ForwardContextGuard guard(context);
  return head(hidden_states(in), in);
}

at::Tensor ModelImpl::encode(const ModelInput& in) {
  const ForwardContext context = context_of(in, config_.is_decoder());
  ForwardContextGuard guard(context);
  return hidden_states(in);
}

at::Tensor ModelImpl::run_layer(const std::function<at::Tensor(const at::Tensor&)>& layer,
                                const at::Tensor& x, bool cached) const {
  if (checkpoint_layers_ && is_training() && at::GradMode::is_enabled() && !cached)
    return checkpointed(layer, x);
  return layer(x);
}

at::Tensor ModelImpl::lm_loss(const ModelInput& in, const at::Tensor& targets, int64_t ignore_index) {
  MDL_CHECK(config_.head == HeadKind::causal_lm, "[lm_loss] this ", config_.architecture,
            " has no causal-LM head; lm_loss scores next tokens (train classifiers through forward)");
  MDL_CHECK(targets.dim() == 2 && targets.size(0) == in.input_ids.size(0) &&
                targets.size(1) == in.input_ids.size(1),
            "[lm_loss] targets must be (batch, tokens) = ", in.input_ids.sizes(), " like input_ids, got ",
            targets.sizes());
  const ForwardContext context = context_of(in, config_.is_decoder());
  ForwardContextGuard guard(context);
  const at::Tensor hidden = hidden_states(in);  // (B, T, C)
  const at::Tensor flat_targets = targets.reshape({-1}).to(hidden.device());
  if (lm_head_->site()->empty())
    return fn::linear_cross_entropy(hidden.reshape({-1, hidden.size(2)}), lm_head_->weight, lm_head_->bias,
                                    flat_targets, ignore_index);
  const at::Tensor logits = lm_head_(hidden);  // (B, T, V): a module at lm_head needs them whole
  return at::cross_entropy_loss(logits.reshape({-1, logits.size(2)}).to(at::kFloat), flat_targets, {},
                                at::Reduction::Mean, ignore_index);
}

at::Tensor ModelImpl::embed_with_virtual_tokens(const Site& site, const at::Tensor& ids,
                                                const at::Tensor& embeddings, ModelInput& in,
                                                int64_t& virtual_tokens) const {
  at::Tensor x =
      site.apply(ids, embeddings);  // (B, T + n, C): n virtual tokens prepended by input composition
  virtual_tokens = x.size(1) - ids.size(1);
  MDL_CHECK(virtual_tokens >= 0 && x.size(0) == ids.size(0) && x.size(2) == embeddings.size(2),
            "[model] the function at '", site.name(), "' returned ", x.sizes(), " for embeddings ",
            embeddings.sizes(), "; it may only prepend positions");
  if (virtual_tokens > 0) {
    const int64_t B = ids.size(0);
    auto long_opts = ids.options().dtype(at::kLong);
    if (in.position_ids.defined())  // the real tokens' positions move up by n, the virtual ones come first
      in.position_ids = at::cat({at::arange(virtual_tokens, long_opts).expand({B, virtual_tokens}),
                                 in.position_ids + virtual_tokens},
                                1);
    if (in.attention_mask.defined())
      in.attention_mask =
          at::cat({at::ones({B, virtual_tokens}, in.attention_mask.options()), in.attention_mask}, 1);
  }
  // Cached passes after a prompt: a mask that lacks the virtual positions sees them (always visible).
  if (in.attention_mask.defined() && in.cache) {
    const int64_t want = in.cache->length() + x.size(1);
    if (in.attention_mask.size(1) < want)
      in.attention_mask =
          at::cat({at::ones({x.size(0), want - in.attention_mask.size(1)}, in.attention_mask.options()),
                   in.attention_mask},
                  1);
  }
  return x;
}

at::Tensor ModelImpl::head(const at::Tensor& hidden, const ModelInput& in) {
  switch (config_.head) {
    case HeadKind::causal_lm:
      return lm_head_(hidden);  // (B, T, V)
    case HeadKind::token_classification:
      return classifier_(hidden);  // (B, T, L)
    case HeadKind::sequence_classification: {
      if (pooler_) {
        at::Tensor pooled = at::tanh(pooler_(hidden.select(1, 0)));  // (B, C) from the first token
        return classifier_(pooled);                                  // (B, L)
      }
      if (config_.arch == Arch::vit) return classifier_(hidden.select(1, 0));  // (B, L) from [CLS]
      const int64_t B = hidden.size(0), T = hidden.size(1);
      at::Tensor last;  // (B) index of the last real token
      if (in.attention_mask.defined()) {
        at::Tensor mask = in.attention_mask.narrow(1, in.attention_mask.size(1) - T, T).to(hidden.device());
        at::Tensor pos = at::arange(T, at::TensorOptions().dtype(at::kLong).device(hidden.device()));
        last = (mask.to(at::kLong) * (pos + 1)).argmax(1);
      } else {
        last = at::full({B}, T - 1, at::TensorOptions().dtype(at::kLong).device(hidden.device()));
      }
      at::Tensor picked = hidden.gather(1, last.view({B, 1, 1}).expand({B, 1, hidden.size(2)})).squeeze(1);
      return classifier_(picked);  // (B, L)
    }
    case HeadKind::none:
      return hidden;
  }
  return hidden;
}

void ModelImpl::load(const io::CheckpointReader& reader, const LoadOptions& options) {
  const std::string prefix = config_.body_prefix() + ".";
  std::set<std::string> used;
  auto resolve = [&](const std::string& name) -> std::string {
    if (reader.contains(name)) return name;
    if (starts_with(name, prefix) && reader.contains(name.substr(prefix.size())))
      return name.substr(prefix.size());
    for (const auto& [now, old] : {std::pair<std::string, std::string>{"LayerNorm.weight", "LayerNorm.gamma"},
                                   {"LayerNorm.bias", "LayerNorm.beta"}}) {
      if (ends_with(name, now)) {
        std::string legacy = name.substr(0, name.size() - now.size()) + old;
        if (reader.contains(legacy)) return legacy;
        if (starts_with(legacy, prefix) && reader.contains(legacy.substr(prefix.size())))
          return legacy.substr(prefix.size());
      }
    }
    return "";
  };
  auto is_head = [&](const std::string& name) {
    return starts_with(name, "lm_head.") || starts_with(name, "score.") || starts_with(name, "classifier.") ||
           starts_with(name, "bert.pooler.");
  };
  torch::NoGradGuard no_grad;
  std::vector<std::string> initialised;
  at::Generator gen = at::detail::createCPUGenerator(options.seed);
  for (auto& item : named_parameters(/*recurse=*/true)) {
    const std::string& name = item.key();
    at::Tensor& param = item.value();
    const std::string disk = resolve(name);
    if (disk.empty()) {
      MDL_CHECK(is_head(name) && options.init_missing_head, "[load] '", reader.path(), "' has no tensor '",
                name, "' (expected shape ", param.sizes(), "); maybe the wrong base model or config.json?");
      at::Tensor init = at::zeros(param.sizes());
      if (param.dim() == 2) init.normal_(0.0, config_.initializer_range, gen);
      param.set_data(init);
      initialised.push_back(name);
      continue;
    }
    used.insert(disk);
    at::Tensor t = reader.tensor(disk);
    MDL_CHECK(at::isFloatingType(t.scalar_type()), "[load] tensor '", disk, "' in '", reader.file_of(disk),
              "' has dtype ", reader.dtype(disk), "; model weights must be floating point");
    if (conv1d_.count(name)) t = t.t();  // Conv1D stores (in, out)
    MDL_CHECK(t.sizes() == param.sizes(), "[load] tensor '", disk, "' in '", reader.file_of(disk),
              "' has shape ", t.sizes(), " but ", config_.architecture, " with this config.json expects ",
              param.sizes(), "; maybe the wrong base model?");
    const int64_t bad = t.numel() - at::isfinite(t).sum().item<int64_t>();
    MDL_CHECK(bad == 0, "[load] tensor '", disk, "' in '", reader.file_of(disk), "' has ", bad,
              " values that are NaN or infinite; a corrupt or diverged checkpoint");
    param.set_data(t);  // zero-copy view of the mapping until `to` converts it
  }
  initialised_ = initialised;
  if (!initialised.empty()) {
    std::string names;
    for (const auto& n : initialised) names += (names.empty() ? "" : ", ") + n;
    log_warn_once("[load] '" + reader.path() + "' has no " + head_name(config_.head) +
                  " head; newly initialised: " + names);
  }
  std::vector<std::string> unused;
  for (const auto& name : reader.names()) {
    if (used.count(name) || is_known_buffer(name)) continue;
    if (name == "lm_head.weight" && config_.tie_word_embeddings) continue;
    unused.push_back(name);
  }
  if (!unused.empty()) {
    std::string list;
    for (size_t i = 0; i < unused.size() && i < 5; ++i) list += (i ? ", " : "") + unused[i];
    log_warn("[load] " + std::to_string(unused.size()) + " tensor(s) of '" + reader.path() +
             "' are not used by " + config_.architecture + ": " + list + (unused.size() > 5 ? ", ..." : ""));
  }
  to(options.device, options.dtype);
}

std::map<std::string, at::Tensor> ModelImpl::hf_tensors() const {
  const std::string prefix = config_.body_prefix() + ".";
  std::map<std::string, at::Tensor> out;
  for (const auto& item : named_parameters(/*recurse=*/true)) {
    std::string name = item.key();
    at::Tensor t = item.value().detach();
    if (conv1d_.count(name)) t = t.t().contiguous();
    if (config_.head == HeadKind::none && starts_with(name, prefix)) name = name.substr(prefix.size());
    out.emplace(name, t);
  }
  return out;
}

void ModelImpl::init_weights(uint64_t seed) {
  torch::NoGradGuard no_grad;
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const double std = config_.initializer_range;
  for (auto& item : named_parameters(/*recurse=*/true)) {
    const std::string& name = item.key();
    at::Tensor& param = item.value();
    at::Tensor init = at::zeros(param.sizes());  // CPU float32, then converted: same values on every device
    if (ends_with(name, ".bias") || ends_with(name, ".temperature")) {
      // zeros (a gmm gate's temperature starts at e^0 = 1)
    } else if (param.dim() == 1) {
      init.fill_(1.0);  // norm scales
    } else {
      double s = std;
      if (residual_projections_.count(name)) s /= std::sqrt(2.0 * static_cast<double>(config_.n_layer));
      init.normal_(0.0, s, gen);
    }
    param.copy_(init.to(param.device(), param.scalar_type()));
  }
}

int64_t ModelImpl::num_parameters() const {
  int64_t n = 0;
  for (const auto& p : parameters()) n += p.numel();
  return n;
}

c10::Device ModelImpl::device() const {
  return parameters().front().device();
}
c10::ScalarType ModelImpl::dtype() const {
  return parameters().front().scalar_type();
}

Model create_model(const ModelConfig& config) {
  switch (config.arch) {
    case Arch::gpt2:
      return create_gpt2(config);
    case Arch::llama:
      return create_llama(config);
    case Arch::bert:
      return create_bert(config);
    case Arch::vit:
      return create_vit(config);
    case Arch::moduleformer:
      return create_moduleformer(config);
  }
  MDL_FAIL("[model] unknown architecture");
}

ArchTargets arch_targets(Arch arch) {
  switch (arch) {
    case Arch::gpt2:
      return gpt2_targets();
    case Arch::llama:
      return llama_targets();
    case Arch::bert:
      return bert_targets();
    case Arch::vit:
      return vit_targets();
    case Arch::moduleformer:
      return moduleformer_targets();
  }
  MDL_FAIL("[model] unknown architecture");
}

namespace {
/// A ModuleFormer gate's parameters over E experts.
int64_t gate_parameters(const ModelConfig& c, int64_t E) {
  const int64_t C = c.hidden_size, G = c.gating_size;
  if (c.gate_type == "linear") return E * C;
  if (c.gate_type == "mlp") return G * C + G + E * G;
  return G * C + E * G + 1;  // gmm
}
}  // namespace

int64_t estimated_parameters(const ModelConfig& c) {
  const int64_t C = c.hidden_size, L = c.n_layer, F = c.intermediate_size, D = c.head_dim;
  if (c.arch == Arch::moduleformer) {
    const int64_t A = c.att_hidden, Ea = c.num_att_experts, Em = c.num_experts;
    const int64_t block = 2 * Ea * C * A + gate_parameters(c, Ea) + 2 * (C * A + A) + 4 * C + 2 * Em * C * F +
                          gate_parameters(c, Em);
    int64_t total = L * block + c.vocab_size * C + 2 * C;
    if (c.head == HeadKind::causal_lm && !c.tie_word_embeddings) total += c.vocab_size * C;
    if (c.head == HeadKind::sequence_classification) total += c.num_labels * C;
    if (c.head == HeadKind::token_classification) total += c.num_labels * (C + 1);
    return total;
  }
  const int64_t q = c.n_head * D, kv = c.n_kv_head * D;
  int64_t attention = C * q + 2 * C * kv + q * C + (c.qkv_bias ? q + 2 * kv : 0) + (c.o_bias ? C : 0);
  const bool gated = c.arch == Arch::llama;
  int64_t mlp = (gated ? 3 : 2) * C * F + (c.mlp_bias ? F + C + (gated ? F : 0) : 0);
  if (c.num_experts > 0) mlp = mlp * c.num_experts + C * c.num_experts;  // experts and the router
  const int64_t norms = (c.arch == Arch::llama ? 2 : 4) * C;  // RMSNorm weight; LayerNorm weight and bias
  int64_t total = L * (attention + mlp + norms);
  switch (c.arch) {
    case Arch::gpt2:
      total += c.vocab_size * C + c.max_position * C + 2 * C;
      break;
    case Arch::llama:
      total += c.vocab_size * C + C;
      break;
    case Arch::bert:
      total += (c.vocab_size + c.max_position + c.type_vocab_size) * C + 2 * C;
      break;
    case Arch::vit:
      total += c.num_channels * c.patch_size * c.patch_size * C + C + (c.num_patches() + 2) * C + 2 * C;
      break;
    case Arch::moduleformer:
      break;  // above
  }
  switch (c.head) {
    case HeadKind::causal_lm:
      total += c.tie_word_embeddings ? 0 : c.vocab_size * C;
      break;
    case HeadKind::sequence_classification:
      total += c.num_labels * (C + 1) + (c.arch == Arch::bert ? C * C + C : 0);
      break;
    case HeadKind::token_classification:
      total += c.num_labels * (C + 1);
      break;
    case HeadKind::none:
      total += c.arch == Arch::bert ? C * C + C : 0;
      break;
  }
  return total;
}

void check_config_fits_checkpoint(const ModelConfig& c, const io::CheckpointReader& reader,
                                  const std::string& file) {
  const bool gpt2 = c.arch == Arch::gpt2 || c.arch == Arch::moduleformer;  // GPT-2's field names
  int64_t layers = 0, elements = 0;
  std::vector<int64_t> embedding;
  std::string embedding_name;
  for (const auto& name : reader.names()) {
    const std::vector<int64_t> shape = reader.shape(name);
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    elements += n;
    // "<...>.layers.7.<...>", "h.7.", "layer.7.": the block index.
    for (const char* block : {"layers.", "h.", "layer."}) {
      const size_t at = name.rfind(std::string(".") + block) != std::string::npos
                            ? name.rfind(std::string(".") + block) + 1
                        : name.rfind(block, 0) == 0 ? 0
                                                    : std::string::npos;
      if (at == std::string::npos) continue;
      const size_t digits = at + std::strlen(block);
      size_t end = digits;
      while (end < name.size() && std::isdigit(static_cast<unsigned char>(name[end]))) ++end;
      if (end > digits && end < name.size() && name[end] == '.' && end - digits < 6)
        layers = std::max<int64_t>(layers, std::stoll(name.substr(digits, end - digits)) + 1);
    }
    for (const char* e : {"embed_tokens.weight", "wte.weight", "word_embeddings.weight"})
      if (name.size() >= std::strlen(e) && name.compare(name.size() - std::strlen(e), std::strlen(e), e) == 0)
        embedding = shape, embedding_name = name;
  }
  const char* layers_field = gpt2 ? "n_layer" : "num_hidden_layers";
  MDL_CHECK(layers == 0 || layers == c.n_layer, "[load] '", file, "': field '", layers_field, "' is ",
            c.n_layer, " but the checkpoint '", reader.path(), "' has ", layers,
            " layers; fix config.json or use its checkpoint");
  if (!embedding.empty())
    MDL_CHECK(embedding.size() == 2 && embedding[0] == c.vocab_size && embedding[1] == c.hidden_size,
              "[load] '", file, "': fields 'vocab_size' ", c.vocab_size, " and '",
              gpt2 ? "n_embd" : "hidden_size", "' ", c.hidden_size, " need a token embedding of shape [",
              c.vocab_size, ", ", c.hidden_size, "], but '", embedding_name, "' is ", shape_str(embedding),
              "; fix config.json or use its checkpoint");
  // The rest of the sizes (intermediate_size, heads, experts) by the parameter count they imply; a new
  // classification head and a pooler may be missing from the file.
  const int64_t expected = estimated_parameters(c);
  const int64_t allowance = c.hidden_size * (c.hidden_size + c.num_labels + 2) + (int64_t{1} << 20);
  MDL_CHECK(expected <= elements + elements / 4 + allowance, "[load] '", file,
            "' describes a model of about ", expected, " parameters, but the checkpoint '", reader.path(),
            "' holds ", elements, "; a size field (", gpt2 ? "n_inner" : "intermediate_size",
            ", the head counts, num_local_experts...) is "
            "wrong; nothing was allocated");
}

Model load_model(const std::string& dir, const LoadOptions& options) {
  ModelConfig config = load_model_config(dir);
  config.name_or_path = dir;
  io::CheckpointReader reader(dir);
  check_config_fits_checkpoint(config, reader, (std::filesystem::path(dir) / "config.json").string());
  Model model = create_model(config);
  model->load(reader, options);
  model->eval();
  return model;
}

void save_model(const ModelImpl& model, const std::string& dir, int64_t max_shard_bytes) {
  std::filesystem::create_directories(dir);
  io::save_checkpoint_tensors(dir, model.hf_tensors(), {{"format", "pt"}}, max_shard_bytes);
  io::write_text_atomic((std::filesystem::path(dir) / "config.json").string(),
                        model_config_to_json(model.config()));
}

}  // namespace mdl
