// A Transformer backbone with its head, loaded from and saved to the Hugging Face layout. Parameters are
// registered under the checkpoint's own tensor names (`model.layers.0.self_attn.q_proj.weight`), so
// loading is a lookup by name. Architectures (gpt2.cpp, llama.cpp, bert.cpp) compose the shared layers
// and expose their sites; this class owns what they share: heads, loading, saving, initialisation.
#pragma once

#include <torch/nn/module.h>

#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "mdl/backbones/layers.h"
#include "mdl/core/forward_context.h"
#include "mdl/core/site.h"
#include "mdl/io/model_config.h"

namespace mdl {

namespace io {
class CheckpointReader;
}
struct RouterOptions;
class Router;

/// Keys and values of earlier positions, per layer, each (B, Hkv, S, D).
struct KVCache {
  std::vector<at::Tensor> k, v;
  /// Number of cached positions.
  int64_t length() const { return k.empty() || !k[0].defined() ? 0 : k[0].size(2); }
  void clear() { k.clear(), v.clear(); }
  /// Appends the new keys/values (B, Hkv, T, D) of `layer` and returns all of them (B, Hkv, S, D).
  std::pair<at::Tensor, at::Tensor> append(int layer, const at::Tensor& new_k, const at::Tensor& new_v);
};

/// One forward pass's inputs.
struct ModelInput {
  at::Tensor input_ids;       ///< (B, T) int64; (B, 0) or undefined for vision backbones
  at::Tensor pixel_values;    ///< (B, C, H, W) float images, for vision backbones (ViT)
  at::Tensor attention_mask;  ///< (B, S) 1 = real token, 0 = padding, S = cached + T; optional
  at::Tensor token_type_ids;  ///< (B, T) BERT segment ids; optional (zeros)
  at::Tensor position_ids;    ///< (B, T); optional (cached + 0..T-1)
  KVCache* cache = nullptr;   ///< decoders: read and extended in place
  /// task/language ids, per-example modules (see routing/); optional
  const RoutingContext* routing = nullptr;
  RoutingLog* routing_log = nullptr;  ///< receives routers' statistics and auxiliary losses; optional
};

/// How to load a checkpoint (the per-run settings, apart from the checkpoint's own hyper-parameters).
struct LoadOptions {
  c10::Device device = c10::Device(c10::kCPU);  ///< where the weights live
  c10::ScalarType dtype = c10::kFloat;          ///< floating weights are converted to this
  bool init_missing_head = true;                ///< a head absent from the checkpoint is initialised (warned)
  uint64_t seed = 0;                            ///< seed for such a head
};

/// A backbone plus head. Frozen or trainable is the caller's choice (requires_grad).
class ModelImpl : public torch::nn::Module {
 public:
  ~ModelImpl() override = default;
  /// Training or evaluation mode for the backbone and every module attached at its sites.
  void train(bool on = true) override;
  const ModelConfig& config() const { return config_; }

  /// Final hidden states (B, T, C), after the final norm for pre-norm models.
  virtual at::Tensor hidden_states(const ModelInput& in) = 0;
  /// The head's output: causal LM (B, T, V); sequence classification (B, L), read at the last real token
  /// for decoders, through the pooler at the first token for BERT and at the [CLS] token for ViT; token
  /// classification (B, T, L); no head: the hidden states (B, T, C).
  at::Tensor forward(const ModelInput& in);
  /// The final hidden states (B, T, C) as forward() computes them (modules, routing context, cache),
  /// without the head: what embeddings pool.
  at::Tensor encode(const ModelInput& in);
  /// Mean cross-entropy of the causal-LM head's logits at each position against `targets` (B, T) aligned
  /// with the positions (position t is scored against targets[:, t]: the caller shifts); positions whose
  /// target is `ignore_index` count for nothing. Equals cross_entropy(forward(in), targets); with no
  /// function attached at the lm_head site, the (B, T, V) logits are never held whole and the gradient
  /// is computed chunk by chunk (fn::linear_cross_entropy). Throws for other heads.
  at::Tensor lm_loss(const ModelInput& in, const at::Tensor& targets, int64_t ignore_index = -100);
  /// Applies the head to hidden states (B, T, C) (inside forward's context).
  at::Tensor head(const at::Tensor& hidden, const ModelInput& in);

  /// Every site, in forward order.
  const std::vector<std::shared_ptr<Site>>& sites() const { return sites_; }
  /// The site called `name`; throws listing a few names if absent.
  Site& site(const std::string& name) const;
  /// The site called `name`, or nullptr.
  Site* find_site(const std::string& name) const;
  /// The projection of a linear site (to merge weights into); throws if `name` is not a linear site.
  SiteLinearImpl& linear(const std::string& name) const;
  /// True if `name` is a linear site.
  bool linear_exists(const std::string& name) const { return linears_.count(name) > 0; }
  /// The norm layer of a norm site; throws if `name` is not one.
  NormImpl& norm(const std::string& name) const;
  /// Replaces the router of every mixture-of-experts layer (Mixtral, upcycled, MoEfied models); throws
  /// for a dense model.
  virtual void set_router(const RouterOptions& options);
  /// The mixture-of-experts layers' router, or nullptr for a dense model.
  virtual const Router* router() const { return nullptr; }
  /// The token embedding table (V, C).
  const at::Tensor& token_embeddings() const { return token_embeddings_; }

  /// Copies weights from a checkpoint by their HF names (Conv1D transposed, prefixes with or without the
  /// body name, tied heads); every shape is checked.
  void load(const io::CheckpointReader& reader, const LoadOptions& options);
  /// The parameters the last load() initialised because the checkpoint lacked them (a new head:
  /// "score.weight"...), by mdl name; empty when every one was on disk.
  const std::vector<std::string>& initialised_parameters() const { return initialised_; }
  /// Tensors as the HF checkpoint stores them (Conv1D transposed back, tied copies dropped).
  std::map<std::string, at::Tensor> hf_tensors() const;
  /// HF-style random initialisation: normal(0, initializer_range) for projections and embeddings, ones and
  /// zeros for norms and biases; GPT-2's residual projections scaled by 1/sqrt(2 n_layer).
  void init_weights(uint64_t seed);
  /// Gradient (activation) checkpointing, as HF's gradient_checkpointing_enable: in training, with a
  /// gradient wanted and no KV cache, every layer keeps only its input and runs again during backward
  /// (activation_checkpoint.h). Off by default.
  void set_gradient_checkpointing(bool on) { checkpoint_layers_ = on; }
  bool gradient_checkpointing() const { return checkpoint_layers_; }
  /// Number of parameters (tied weights counted once).
  int64_t num_parameters() const;
  c10::Device device() const;
  c10::ScalarType dtype() const;

 protected:
  explicit ModelImpl(ModelConfig config);
  /// A linear site registered as `local` under `parent`; `full` is its HF module path.
  SiteLinear add_linear(torch::nn::Module& parent, const std::string& local, const std::string& full,
                        int64_t in, int64_t out, bool bias, int layer, bool conv1d = false);
  /// A norm registered as `local` under `parent` and exposed as a site named `full`.
  Norm add_norm(torch::nn::Module& parent, const std::string& local, const std::string& full,
                NormImpl::Kind kind, int64_t dim, double eps, int layer);
  /// Applies the embedding site. A function there may prepend n virtual tokens (prompt tuning); then
  /// `in`'s mask and positions are extended to cover them and `virtual_tokens` is set to n (the
  /// architecture drops them from its final hidden states, so outputs align with the input tokens).
  at::Tensor embed_with_virtual_tokens(const Site& site, const at::Tensor& ids, const at::Tensor& embeddings,
                                       ModelInput& in, int64_t& virtual_tokens) const;
  /// Position ids (B, T) of the tokens of a pass: `in.position_ids` or past..past+T-1, shifted by the
  /// prefix-tuning positions (real tokens start after the prefix, as Hugging Face counts them).
  at::Tensor positions(const ModelInput& in, int64_t batch, int64_t past, int64_t length) const;
  /// Positions that attention_kv functions prepend (the same at every layer; 0 without prefix tuning).
  int64_t kv_prefix_positions() const;
  /// Applies an attention_kv site to the keys and values (B, Hkv, S, D); returns how many positions it
  /// prepended, and extends `bias` (B, 1, T, S) with visible columns for them.
  int64_t apply_kv_site(const Site& site, at::Tensor& k, at::Tensor& v, at::Tensor& bias) const;
  /// Runs one layer, `layer` (B, T, C) -> (B, T, C), on x: checkpointed when gradient checkpointing is on,
  /// the model is training, a gradient is wanted and `cached` is false. `layer` must capture by value
  /// (it may run again during backward).
  at::Tensor run_layer(const std::function<at::Tensor(const at::Tensor&)>& layer, const at::Tensor& x,
                       bool cached) const;
  /// A hidden-state or embedding site (no weights of its own).
  std::shared_ptr<Site> add_site(SiteInfo info);
  /// Records a site (every add_* goes through here): forward order and the name index.
  void register_site(std::shared_ptr<Site> site);
  /// Creates the head modules; architectures call it last, with their token embedding (for tying; an
  /// empty holder for models without tokens).
  void build_head(const Embedding& token_embedding);
  /// A plain container module registered as `name` under `parent` (for HF's module nesting).
  static std::shared_ptr<torch::nn::Module> add_container(torch::nn::Module& parent, const std::string& name);

  ModelConfig config_;
  std::vector<std::shared_ptr<Site>> sites_;
  std::map<std::string, Site*> site_index_;
  std::vector<std::string> initialised_;            // see initialised_parameters
  std::map<std::string, SiteLinearImpl*> linears_;  ///< linear sites' projections, owned by the module tree
  std::map<std::string, NormImpl*> norms_;          ///< norm sites' layers
  at::Tensor token_embeddings_;                     ///< set by build_head
  std::set<std::string> conv1d_;                    ///< parameter names stored (in, out) on disk
  std::set<std::string> residual_projections_;      ///< GPT-2 init scaling
  SiteLinear lm_head_{nullptr};
  bool checkpoint_layers_ = false;  ///< gradient checkpointing (set_gradient_checkpointing)
  SiteLinear classifier_{nullptr};  ///< score / classifier
  SiteLinear pooler_{nullptr};      ///< BERT pooler dense
};

using Model = std::shared_ptr<ModelImpl>;

/// A model of `config`'s architecture with zero weights (call init_weights or load).
Model create_model(const ModelConfig& config);

/// The projections PEFT attaches to by default on an architecture, by their site-name suffixes (PEFT's
/// target-module mappings); each architecture declares its own (e.g. gpt2_targets()).
struct ArchTargets {
  std::vector<std::string> attention;    ///< the query and value projections: LoRA and its kin
  std::vector<std::string> ia3;          ///< keys, values and the MLP's output projection: (IA)^3
  std::vector<std::string> ia3_exclude;  ///< suffixes (IA)^3 must not take although `ia3` matches them
};
ArchTargets arch_targets(Arch arch);
/// How many parameters create_model(config) allocates, computed from the sizes alone (within a few
/// percent; tested against every preset): what a config claims before anything is allocated.
int64_t estimated_parameters(const ModelConfig& config);
/// Checks `config` against the checkpoint's tensor index before the model is built: the layer count, the
/// token embedding's shape and the parameter count it implies. Throws naming the config field.
void check_config_fits_checkpoint(const ModelConfig& config, const io::CheckpointReader& reader,
                                  const std::string& config_file);
/// Loads `DIR/config.json` and the checkpoint's tensors.
Model load_model(const std::string& dir, const LoadOptions& options = {});
/// Writes config.json and the tensors (sharded above `max_shard_bytes` if > 0) in the HF layout.
void save_model(const ModelImpl& model, const std::string& dir, int64_t max_shard_bytes = 0);

}  // namespace mdl
