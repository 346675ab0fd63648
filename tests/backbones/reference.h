// An independent, straightforward implementation of GPT-2, Llama (Mistral, Qwen2) and BERT, written from
// the equations for the tests: one sequence at a time, float64, a loop over heads, explicit softmax,
// norms and activations, and the checkpoint's tensors read by name in their on-disk layout (GPT-2's
// Conv1D multiplies x @ W as HF's Conv1D does). It shares no code with mdl's backbones.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "mdl/io/model_config.h"
#include "mdl/io/safetensors.h"

namespace mdl::reference {

struct Weights {
  std::map<std::string, at::Tensor> t;
  std::string prefix;  // body prefix present in the file ("transformer." or "")
  at::Tensor operator()(const std::string& name) const {
    auto it = t.find(prefix + name);
    if (it == t.end()) it = t.find(name);
    if (it == t.end()) throw std::runtime_error("reference: missing tensor " + name);
    return it->second.to(at::kDouble);
  }
  bool has(const std::string& name) const { return t.count(prefix + name) || t.count(name); }
};

inline Weights load(const std::string& dir, const std::string& prefix) {
  Weights w;
  w.t = io::load_safetensors(dir + "/model.safetensors");
  w.prefix = prefix;
  return w;
}

inline at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, double eps) {
  at::Tensor mean = x.mean(-1, true);
  at::Tensor var = (x - mean).pow(2).mean(-1, true);
  return (x - mean) / (var + eps).sqrt() * w + b;
}

inline at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  return x / (x.pow(2).mean(-1, true) + eps).sqrt() * w;
}

inline at::Tensor softmax_rows(const at::Tensor& s) {
  at::Tensor e = (s - std::get<0>(s.max(-1, true))).exp();
  return e / e.sum(-1, true);
}

inline at::Tensor gelu_tanh(const at::Tensor& x) {
  return 0.5 * x * (1 + (std::sqrt(2.0 / M_PI) * (x + 0.044715 * x.pow(3))).tanh());
}
inline at::Tensor gelu_erf(const at::Tensor& x) {
  return 0.5 * x * (1 + (x / std::sqrt(2.0)).erf());
}
inline at::Tensor silu_ref(const at::Tensor& x) {
  return x / (1 + (-x).exp());
}

// Causal (and windowed) attention scores mask: -inf where key j may not be seen from query i.
inline at::Tensor causal_mask(int64_t T, int64_t window) {
  at::Tensor m = at::zeros({T, T}, at::kDouble);
  for (int64_t i = 0; i < T; ++i)
    for (int64_t j = 0; j < T; ++j)
      if (j > i || (window > 0 && i - j >= window)) m[i][j] = -INFINITY;
  return m;
}

/// GPT-2 LM logits (T, V) for one sequence of ids (T).
inline at::Tensor gpt2(const Weights& w, const ModelConfig& c, const at::Tensor& ids) {
  const int64_t T = ids.size(0), C = c.hidden_size, H = c.n_head, D = C / H;
  at::Tensor h = w("wte.weight").index_select(0, ids) + w("wpe.weight").narrow(0, 0, T);
  at::Tensor mask = causal_mask(T, 0);
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const std::string p = "h." + std::to_string(l) + ".";
    at::Tensor a = layer_norm(h, w(p + "ln_1.weight"), w(p + "ln_1.bias"), c.norm_eps);
    at::Tensor qkv = a.mm(w(p + "attn.c_attn.weight")) + w(p + "attn.c_attn.bias");  // Conv1D: x @ W
    std::vector<at::Tensor> heads;
    for (int64_t hd = 0; hd < H; ++hd) {
      at::Tensor q = qkv.narrow(1, hd * D, D), k = qkv.narrow(1, C + hd * D, D),
                 v = qkv.narrow(1, 2 * C + hd * D, D);
      heads.push_back(softmax_rows(q.mm(k.t()) / std::sqrt(double(D)) + mask).mm(v));
    }
    h = h + at::cat(heads, 1).mm(w(p + "attn.c_proj.weight")) + w(p + "attn.c_proj.bias");
    at::Tensor m = layer_norm(h, w(p + "ln_2.weight"), w(p + "ln_2.bias"), c.norm_eps);
    at::Tensor f = gelu_tanh(m.mm(w(p + "mlp.c_fc.weight")) + w(p + "mlp.c_fc.bias"));
    h = h + f.mm(w(p + "mlp.c_proj.weight")) + w(p + "mlp.c_proj.bias");
  }
  h = layer_norm(h, w("ln_f.weight"), w("ln_f.bias"), c.norm_eps);
  at::Tensor head = w.t.count("lm_head.weight") && !c.tie_word_embeddings
                        ? w.t.at("lm_head.weight").to(at::kDouble)
                        : w("wte.weight");
  return h.mm(head.t());
}

// Rotates each pair (j, j + D/2) of x (T, D) by angle pos * theta^(-2j/D). Tensor ops throughout, so
// gradients flow through it.
inline at::Tensor rope(const at::Tensor& x, const at::Tensor& positions, double theta) {
  const int64_t D = x.size(1), half = D / 2;
  at::Tensor inv_freq = at::pow(theta, at::arange(half, at::kDouble) * (-2.0 / D));  // (D/2)
  at::Tensor angle = positions.to(at::kDouble).unsqueeze(1) * inv_freq;              // (T, D/2)
  at::Tensor c = angle.cos(), s = angle.sin();
  at::Tensor a = x.narrow(1, 0, half), b = x.narrow(1, half, half);
  return at::cat({a * c - b * s, b * c + a * s}, 1);
}

/// Llama-family final hidden states (T, C) for one sequence (positions 0..T-1).
inline at::Tensor llama_hidden(const Weights& w, const ModelConfig& c, const at::Tensor& ids) {
  const int64_t T = ids.size(0), H = c.n_head, Hkv = c.n_kv_head, D = c.head_dim;
  at::Tensor h = w("embed_tokens.weight").index_select(0, ids);
  at::Tensor mask = causal_mask(T, c.sliding_window);
  at::Tensor positions = at::arange(T, at::kDouble);
  auto linear = [&](const at::Tensor& x, const std::string& name, bool bias) {
    at::Tensor y = x.mm(w(name + ".weight").t());
    return bias ? y + w(name + ".bias") : y;
  };
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const std::string p = "layers." + std::to_string(l) + ".";
    at::Tensor a = rms_norm(h, w(p + "input_layernorm.weight"), c.norm_eps);
    at::Tensor q = linear(a, p + "self_attn.q_proj", c.qkv_bias);
    at::Tensor k = linear(a, p + "self_attn.k_proj", c.qkv_bias);
    at::Tensor v = linear(a, p + "self_attn.v_proj", c.qkv_bias);
    std::vector<at::Tensor> heads;
    for (int64_t hd = 0; hd < H; ++hd) {
      const int64_t g = hd / (H / Hkv);  // the key/value head this query head shares
      at::Tensor qh = rope(q.narrow(1, hd * D, D), positions, c.rope_theta);
      at::Tensor kh = rope(k.narrow(1, g * D, D), positions, c.rope_theta);
      heads.push_back(softmax_rows(qh.mm(kh.t()) / std::sqrt(double(D)) + mask).mm(v.narrow(1, g * D, D)));
    }
    h = h + linear(at::cat(heads, 1), p + "self_attn.o_proj", c.o_bias);
    at::Tensor m = rms_norm(h, w(p + "post_attention_layernorm.weight"), c.norm_eps);
    if (c.num_experts == 0) {
      h = h + linear(silu_ref(linear(m, p + "mlp.gate_proj", false)) * linear(m, p + "mlp.up_proj", false),
                     p + "mlp.down_proj", false);
      continue;
    }
    // Mixtral: token by token, softmax over the router logits, the k largest renormalised.
    at::Tensor out = at::zeros_like(m);
    for (int64_t t = 0; t < T; ++t) {
      at::Tensor x = m.narrow(0, t, 1);
      at::Tensor probs = softmax_rows(linear(x, p + "block_sparse_moe.gate", false))[0];
      std::vector<std::pair<double, int64_t>> ranked;
      for (int64_t e = 0; e < c.num_experts; ++e) ranked.push_back({probs[e].item<double>(), e});
      std::sort(ranked.begin(), ranked.end(), [](auto a, auto b) { return a.first > b.first; });
      double total = 0;
      for (int64_t j = 0; j < c.experts_per_token; ++j) total += ranked[j].first;
      for (int64_t j = 0; j < c.experts_per_token; ++j) {
        const std::string e = p + "block_sparse_moe.experts." + std::to_string(ranked[j].second) + ".";
        at::Tensor y =
            linear(silu_ref(linear(x, e + "w1", false)) * linear(x, e + "w3", false), e + "w2", false);
        out[t] += (ranked[j].first / total) * y[0];
      }
    }
    h = h + out;
  }
  return rms_norm(h, w("norm.weight"), c.norm_eps);
}

inline at::Tensor llama(const Weights& w, const ModelConfig& c, const at::Tensor& ids) {
  at::Tensor head =
      c.tie_word_embeddings ? w("embed_tokens.weight") : w.t.at("lm_head.weight").to(at::kDouble);
  return llama_hidden(w, c, ids).mm(head.t());
}

/// BERT sequence-classification logits (L) for one unpadded sequence.
inline at::Tensor bert_classify(const Weights& w, const ModelConfig& c, const at::Tensor& ids) {
  const int64_t T = ids.size(0), C = c.hidden_size, H = c.n_head, D = C / H;
  auto linear = [&](const at::Tensor& x, const std::string& name) {
    return x.mm(w(name + ".weight").t()) + w(name + ".bias");
  };
  at::Tensor h = w("embeddings.word_embeddings.weight").index_select(0, ids) +
                 w("embeddings.position_embeddings.weight").narrow(0, 0, T) +
                 w("embeddings.token_type_embeddings.weight")[0];
  h = layer_norm(h, w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"), c.norm_eps);
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const std::string p = "encoder.layer." + std::to_string(l) + ".";
    at::Tensor q = linear(h, p + "attention.self.query"), k = linear(h, p + "attention.self.key"),
               v = linear(h, p + "attention.self.value");
    std::vector<at::Tensor> heads;
    for (int64_t hd = 0; hd < H; ++hd)
      heads.push_back(
          softmax_rows(q.narrow(1, hd * D, D).mm(k.narrow(1, hd * D, D).t()) / std::sqrt(double(D)))
              .mm(v.narrow(1, hd * D, D)));
    at::Tensor a = layer_norm(h + linear(at::cat(heads, 1), p + "attention.output.dense"),
                              w(p + "attention.output.LayerNorm.weight"),
                              w(p + "attention.output.LayerNorm.bias"), c.norm_eps);
    at::Tensor i = gelu_erf(linear(a, p + "intermediate.dense"));
    h = layer_norm(a + linear(i, p + "output.dense"), w(p + "output.LayerNorm.weight"),
                   w(p + "output.LayerNorm.bias"), c.norm_eps);
  }
  at::Tensor pooled = linear(h.narrow(0, 0, 1), "pooler.dense").tanh();
  return (pooled.mm(w.t.at("classifier.weight").to(at::kDouble).t()) +
          w.t.at("classifier.bias").to(at::kDouble))[0];
}

}  // namespace mdl::reference
