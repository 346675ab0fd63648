// ModuleFormer (Shen et al., 2023; IBM's MoLM checkpoints): modularity inside the backbone. Token
// embeddings only (no positions: stick-breaking attention orders the keys), pre-LayerNorm blocks of a
// mixture of attention heads and a mixture-of-experts MLP, a final LayerNorm and an untied head, under
// the tensor names of IBM's Hugging Face code (modeling_moduleformer.py):
//   transformer.wte.weight                                 (V, C)
//   transformer.h.L.ln_1.{weight,bias}, ln_2.{weight,bias}  (C)
//   transformer.h.L.attn.q_proj.experts.weight             (E_att, C, A)   W_q^e, stored (in, out)
//   transformer.h.L.attn.q_proj.output_experts.weight      (E_att, A, C)   W_o^e
//   transformer.h.L.attn.q_proj.gate.*                     the attention router (routing/gates.h)
//   transformer.h.L.attn.{k_proj,v_proj}.{weight,bias}     (A, C), (A): shared keys and values
//   transformer.h.L.mlpf.experts.weight                    (E_mlp, C, F)
//   transformer.h.L.mlpf.output_experts.weight             (E_mlp, F, C)
//   transformer.h.L.mlpf.gate.*                            the MLP router
//   transformer.ln_f.{weight,bias}, lm_head.weight         (V, C)
// Every block: h += MoA(ln_1 h); h += MoE(ln_2 h), MoE(x) = sum_e g_e W2^e act(W1^e x). Both mixtures are
// a LearnedRouter over a gate plus grouped dispatch, the parts every mixture of mdl uses: `set_router`
// swaps their policy, the routing log records each layer's load and entropies, and the aux losses (MI or
// switch + z) come from the config's aux_loss_type and aux_loss_weight. Sites as every backbone has them:
// the norms, k_proj and v_proj (LoRA, (IA)^3), `.attn` and `.mlpf` sublayers (adapters, fusion, groups),
// `.attn.kv` (prefix tuning), each block's output and the embedding.
#pragma once

#include "mdl/backbones/model.h"

namespace mdl {

/// A ModuleFormer (zero weights) for `config`, with the head its architecture names.
Model create_moduleformer(const ModelConfig& config);
/// ModuleFormer's default PEFT targets: the shared key and value projections.
ArchTargets moduleformer_targets();
/// The router options of a ModuleFormer's mixtures with `k` experts per token: the config's `mdl_router`
/// when present, else top-k of the softmax, not renormalised, with sample_topk and the aux loss the config
/// names (mi: mi_loss_coef = aux_loss_weight; switch: IBM's switch loss, load balancing / k, and 0.1 z-loss).
RouterOptions moduleformer_config_router(const ModelConfig& config, int64_t k);

}  // namespace mdl
