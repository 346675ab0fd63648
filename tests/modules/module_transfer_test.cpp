// Moving modules between models (modules/module_transfer): the layer maps and their refusals, skip and avg
// against the teacher's tensors, prune-align's slicing against explicit feature maps (the identity map
// equals copying), the alignment found on a student that is the teacher with its hidden features permuted
// (which must find the permutation and give the teacher's outputs), and the types that cannot move.
#include "mdl/modules/module_transfer.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/utils.h>

#include <cmath>
#include <numeric>

#include "backbones/fixtures.h"
#include "mdl/modules/module_set.h"
#include "mdl/ops/correlation.h"
#include "mdl/tokenizers/tokenizer.h"
#include "test_util.h"

namespace mdl {
namespace {

/// A Llama of the tiny preset's shape with `layers` blocks and width `hidden`, random weights.
Model llama(int64_t layers, int64_t hidden, uint64_t seed) {
  ModelConfig c = load_model(test::tiny_checkpoint("llama"))->config();
  c.n_layer = layers;
  c.hidden_size = hidden;
  c.head_dim = hidden / c.n_head;
  Model m = create_model(c);
  m->init_weights(seed);
  return m;
}

/// A module of `config` on `model` with random (non-zero) tensors, read back as files would be.
ModuleFiles random_module(const Model& model, const ModuleConfig& config, uint64_t seed) {
  ModuleSet set(model);
  set.add("m", config);
  torch::NoGradGuard g;
  at::manual_seed(seed);
  for (auto& [k, t] : set.tensors("m")) t.copy_(at::randn_like(t) * 0.2);
  ModuleFiles f;
  f.format = "native";
  f.config = set.config("m");
  f.sites = set.sites("m");
  for (const auto& [k, t] : set.tensors("m")) f.tensors[k] = t.clone();
  return f;
}

std::vector<int64_t> iota(int64_t n) {
  std::vector<int64_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), 0);
  return v;
}

/// Feature maps for each of module `m`'s sites: a side whose widths differ between `teacher` and `student`
/// takes `keep`; with `keep` empty, every side is the identity.
Alignment maps_for(const ModuleFiles& m, const ModelImpl& teacher, const ModelImpl& student,
                   const std::vector<int64_t>& keep) {
  Alignment a;
  for (const auto& s : m.sites) {
    const SiteInfo &ti = teacher.site(s).info(), &si = student.site(s).info();
    FeatureMap f;
    if (keep.empty()) {
      f.input = iota(ti.in_features), f.output = iota(ti.out_features);
    } else {
      if (ti.in_features != si.in_features) f.input = keep;
      if (ti.out_features != si.out_features) f.output = keep;
    }
    a[s] = f;
  }
  return a;
}

ModuleConfig lora(std::vector<std::string> targets) {
  ModuleConfig c;
  c.type = "lora";
  c.lora.r = 4;
  c.targets.target_modules = std::move(targets);
  return c;
}

ModuleConfig adapter() {
  ModuleConfig c;
  c.type = "adapter";
  c.adapter.reduction_factor = 8;
  return c;
}

TEST(ModuleTransfer, LayerMapsAndTheirRefusals) {
  TransferOptions skip, avg;
  avg.method = "avg";
  EXPECT_EQ(transfer_layer_map(4, 2, skip), (std::vector<std::vector<int64_t>>{{0}, {2}}));
  EXPECT_EQ(transfer_layer_map(6, 2, avg), (std::vector<std::vector<int64_t>>{{0, 1, 2}, {3, 4, 5}}));
  EXPECT_EQ(transfer_layer_map(24, 12, skip).back(), (std::vector<int64_t>{22}));
  TransferOptions k3 = skip;
  k3.k = 3;
  EXPECT_EQ(transfer_layer_map(7, 3, k3), (std::vector<std::vector<int64_t>>{{0}, {3}, {6}}));
  EXPECT_THROW_WITH(transfer_layer_map(6, 4, skip), "the teacher has 6 layers and the student 4");
  k3.method = "avg";
  EXPECT_THROW_WITH(transfer_layer_map(7, 3, k3), "maps student layer 2 to teacher layer 8");
  TransferOptions bad;
  bad.method = "copy";
  EXPECT_THROW_WITH(transfer_layer_map(4, 2, bad), "method 'copy' is unknown");

  EXPECT_EQ(site_in_layer("model.layers.3.self_attn.q_proj", 1), "model.layers.1.self_attn.q_proj");
  EXPECT_EQ(site_in_layer("vit.encoder.layer.10.output", 5), "vit.encoder.layer.5.output");
  EXPECT_EQ(site_in_layer("lm_head", 2), "lm_head");
}

TEST(ModuleTransfer, SkipAndAvgTakeTheTeachersLayers) {
  Model teacher = llama(4, 64, 1), student = llama(2, 64, 2);
  const ModuleFiles m = random_module(teacher, lora({"q_proj", "v_proj", "lm_head"}), 3);
  auto tensor = [&](const ModuleFiles& f, int64_t layer, const std::string& p) {
    return f.tensors.at("model.layers." + std::to_string(layer) + ".self_attn.q_proj." + p);
  };
  nlohmann::json report;
  const ModuleFiles skip = transfer_module(m, *teacher, *student, {}, {}, &report);
  EXPECT_EQ(skip.sites.size(), 2u * 2 + 1);  // q, v per student layer, lm_head
  for (int64_t l = 0; l < 2; ++l)
    for (const char* p : {"lora_A", "lora_B"})
      EXPECT_TRUE(at::equal(tensor(skip, l, p), tensor(m, 2 * l, p)));
  EXPECT_TRUE(at::equal(skip.tensors.at("lm_head.lora_A"), m.tensors.at("lm_head.lora_A")));
  EXPECT_EQ(report["unused_teacher_sites"].size(), 4u);  // layers 1 and 3
  EXPECT_EQ(report["layer_map"], nlohmann::json::parse("[[0], [2]]"));

  TransferOptions avg;
  avg.method = "avg";
  const ModuleFiles mean = transfer_module(m, *teacher, *student, avg);
  TransferOptions reference = avg;
  reference.avg_reference = true;
  const ModuleFiles quirk = transfer_module(m, *teacher, *student, reference);
  for (int64_t l = 0; l < 2; ++l)
    for (const char* p : {"lora_A", "lora_B"}) {
      EXPECT_CLOSE(tensor(mean, l, p), (tensor(m, 2 * l, p) + tensor(m, 2 * l + 1, p)) / 2, 1e-6);
      EXPECT_CLOSE(tensor(quirk, l, p), tensor(m, 2 * l, p) / 2, 1e-6);  // the paper's code at k = 2
    }
  // What moved attaches to the student: every site and shape checked there.
  ModuleSet set(student);
  EXPECT_NO_THROW(set.attach(mean, "moved", true));

  // avg needs the module in every teacher layer it averages.
  ModuleConfig some = lora({"q_proj"});
  some.targets.layers_to_transform = {0, 2};
  const ModuleFiles partial = random_module(teacher, some, 4);
  EXPECT_NO_THROW(transfer_module(partial, *teacher, *student, {}));
  EXPECT_THROW_WITH(transfer_module(partial, *teacher, *student, avg),
                    "no part at 'model.layers.1.self_attn");
}

TEST(ModuleTransfer, PruneAlignSlicesAlongTheFeatureMaps) {
  Model teacher = llama(2, 64, 1), narrow = llama(2, 48, 2), same = llama(2, 64, 5);
  TransferOptions pa;
  pa.method = "prune-align";
  for (const ModuleConfig& config : {lora({"q_proj", "o_proj", "down_proj"}), adapter()}) {
    const ModuleFiles m = random_module(teacher, config, 7);
    // The identity map on equal widths is a copy.
    const ModuleFiles copied = transfer_module(m, *teacher, *same, pa, maps_for(m, *teacher, *teacher, {}));
    ASSERT_EQ(copied.tensors.size(), m.tensors.size());
    for (const auto& [k, t] : m.tensors) EXPECT_TRUE(at::equal(copied.tensors.at(k), t)) << k;

    // Without a map, narrower widths are refused with the way to align them.
    EXPECT_THROW_WITH(transfer_module(m, *teacher, *narrow, pa), "the features need aligning");
    // A map of 48 of the 64 hidden features (reversed order, every fourth left out).
    std::vector<int64_t> keep;
    for (int64_t j = 63; j >= 0; --j)
      if (j % 4 != 1) keep.push_back(j);
    ASSERT_EQ(keep.size(), 48u);
    const Alignment a = maps_for(m, *teacher, *narrow, keep);
    nlohmann::json report;
    const ModuleFiles moved = transfer_module(m, *teacher, *narrow, pa, a, &report);
    const at::Tensor idx = at::tensor(keep, at::kLong);
    const std::string L = "model.layers.1.";
    if (config.type == "lora") {
      // q_proj: input hidden (sliced), output q features (48 in the student: sliced too).
      EXPECT_TRUE(at::equal(moved.tensors.at(L + "self_attn.q_proj.lora_A"),
                            m.tensors.at(L + "self_attn.q_proj.lora_A").index_select(1, idx)));
      EXPECT_TRUE(at::equal(moved.tensors.at(L + "self_attn.q_proj.lora_B"),
                            m.tensors.at(L + "self_attn.q_proj.lora_B").index_select(0, idx)));
      // down_proj: input is the MLP width (128 in both: kept), output hidden (sliced).
      EXPECT_TRUE(
          at::equal(moved.tensors.at(L + "mlp.down_proj.lora_A"), m.tensors.at(L + "mlp.down_proj.lora_A")));
      EXPECT_TRUE(at::equal(moved.tensors.at(L + "mlp.down_proj.lora_B"),
                            m.tensors.at(L + "mlp.down_proj.lora_B").index_select(0, idx)));
    } else {
      // The bottleneck stays 8: reduction factor 64 / 8 -> 48 / 8.
      EXPECT_EQ(moved.config.adapter.reduction_factor, 6);
      const std::string s = L + "mlp.";
      EXPECT_TRUE(at::equal(moved.tensors.at(s + "adapter_down.0.weight"),
                            m.tensors.at(s + "adapter_down.0.weight").index_select(1, idx)));
      EXPECT_TRUE(
          at::equal(moved.tensors.at(s + "adapter_down.0.bias"), m.tensors.at(s + "adapter_down.0.bias")));
      EXPECT_TRUE(at::equal(moved.tensors.at(s + "adapter_up.weight"),
                            m.tensors.at(s + "adapter_up.weight").index_select(0, idx)));
      EXPECT_TRUE(at::equal(moved.tensors.at(s + "adapter_up.bias"),
                            m.tensors.at(s + "adapter_up.bias").index_select(0, idx)));
    }
    EXPECT_TRUE(report["sites"][0].contains("sliced"));
    ModuleSet set(narrow);
    EXPECT_NO_THROW(set.attach(moved, "moved", true)) << config.type;
  }
  // A bottleneck that no whole reduction factor keeps is refused.
  ModuleConfig odd = adapter();
  odd.adapter.reduction_factor = 2;  // bottleneck 32, which does not divide 48
  EXPECT_THROW_WITH(
      transfer_module(random_module(teacher, odd, 8), *teacher, *narrow, pa, {}),
      "the bottleneck 32 (hidden 64 / reduction_factor 2) is no whole fraction of hidden size 48");
}

TEST(ModuleTransfer, TypesThatDoNotMoveAreRefused) {
  Model teacher = llama(2, 64, 1), narrow = llama(2, 48, 2);
  ModuleConfig prefix;
  prefix.type = "prefix";
  EXPECT_THROW_WITH(transfer_module(random_module(teacher, prefix, 1), *teacher, *narrow, {}),
                    "a prefix module's parameters do not lie along its sites' features");
  ModuleConfig bert_lora = lora({"q_proj"});
  Model bert = load_model(test::tiny_checkpoint("bert"));
  EXPECT_THROW_WITH(transfer_module(random_module(teacher, bert_lora, 1), *teacher, *bert, {}),
                    "modules move between models of one family");
}

/// Three batches of 8 random 24-token texts that both models read in the same tokens.
std::vector<PairedBatch> same_tokens(const ModelImpl& teacher, at::Generator& gen) {
  std::vector<PairedBatch> batches;
  for (int b = 0; b < 3; ++b) {
    PairedBatch p;
    p.teacher.input_ids = at::randint(5, teacher.config().vocab_size, {8, 24}, gen, at::kLong);
    p.student = p.teacher;
    batches.push_back(p);
  }
  return batches;
}

/// How a Llama parameter meets the residual stream's features: read along its columns (embeddings,
/// projections from the hidden state, the LM head), written along its rows (o_proj, down_proj), a norm's
/// gain, or not at all.
enum class Side { reads, writes, gain, none };
Side side_of(const std::string& n) {
  auto ends = [&](const std::string& suffix) {
    return n.size() >= suffix.size() && n.compare(n.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  for (const char* r : {"embed_tokens.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight",
                        "gate_proj.weight", "up_proj.weight", "lm_head.weight"})
    if (ends(r)) return Side::reads;
  if (ends("o_proj.weight") || ends("down_proj.weight")) return Side::writes;
  if (ends("norm.weight") || ends("layernorm.weight")) return Side::gain;
  return Side::none;
}

/// `teacher` with its hidden features permuted by `perm` (a new basis of the residual stream): the
/// embeddings' and every reader's input columns, every writer's output rows and the norms' gains. RMSNorm
/// commutes with the permutation, so the student computes what the teacher does with permuted hidden states.
Model permuted(const Model& teacher, const at::Tensor& perm) {
  Model s = create_model(teacher->config());
  auto from = teacher->named_parameters();
  torch::NoGradGuard g;
  for (auto& p : s->named_parameters()) {
    const std::string& n = p.key();
    at::Tensor v = from[n].clone();
    const Side side = side_of(n);
    if (side == Side::reads)
      v = v.index_select(1, perm);
    else if (side != Side::none)
      v = v.index_select(0, perm);
    p.value().copy_(v);
  }
  return s;
}

TEST(ModuleTransfer, AlignmentFindsAPermutedStudentsFeatures) {
  Model teacher = llama(2, 64, 1);
  auto gen = at::detail::createCPUGenerator(9);
  const at::Tensor perm = at::randperm(64, gen, at::kLong);  // student feature i = teacher feature perm[i]
  Model student = permuted(teacher, perm);
  const ModuleFiles m = random_module(teacher, lora({"q_proj", "v_proj", "o_proj", "down_proj"}), 11);
  TransferOptions pa;
  pa.method = "prune-align";
  const auto site_map = transfer_site_map(*teacher, *student, m.sites, pa);
  const std::vector<PairedBatch> batches = same_tokens(*teacher, gen);
  const Alignment a = measure_alignment(*teacher, *student, site_map, batches, /*equal_widths=*/true);
  const std::vector<int64_t> want(perm.data_ptr<int64_t>(), perm.data_ptr<int64_t>() + 64);
  for (int64_t l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l);
    EXPECT_EQ(a.at(p + ".self_attn.q_proj").input, want) << "the hidden features behind q_proj";
    EXPECT_GT(a.at(p + ".self_attn.q_proj").input_r, 0.999);
    EXPECT_EQ(a.at(p + ".mlp.down_proj").output, want) << "the hidden features down_proj writes";
    EXPECT_EQ(a.at(p + ".self_attn.q_proj").output, iota(64)) << "the queries are not permuted";
  }
  {
    torch::NoGradGuard g;
    ModelInput in;
    in.input_ids = at::randint(5, teacher->config().vocab_size, {2, 10}, gen, at::kLong);
    EXPECT_CLOSE(student->hidden_states(in), teacher->hidden_states(in).index_select(-1, perm), 1e-4);
  }
  // With those maps the moved LoRA changes the student exactly as the original changes the teacher.
  const ModuleFiles moved = transfer_module(m, *teacher, *student, pa, a);
  ModuleSet ts(teacher), ss(student);
  ts.attach(m, "m", true), ss.attach(moved, "m", true);
  torch::NoGradGuard g;
  ModelInput in;
  in.input_ids = at::randint(5, teacher->config().vocab_size, {2, 10}, gen, at::kLong);
  const at::Tensor want_logits = teacher->forward(in), got = student->forward(in);
  EXPECT_CLOSE(got, want_logits, 1e-4);
  ts.set_active("m", false);
  EXPECT_CHANGED(teacher->forward(in), want_logits);  // the module matters
}

/// `student` (hidden C) placed at teacher features `at` (C of them) of a teacher of hidden `wide`, the other
/// features dead: zero in the embeddings, in every reader's input columns and every writer's output rows.
/// The norms' gains are scaled by sqrt(C / wide) and their eps by C / wide, which undoes the wider mean in
/// RMSNorm (x / sqrt(mean(x^2) + eps)), so the teacher's
/// hidden states at `at` are the student's and everything else it computes is the student's too.
Model widened(const Model& student, const at::Tensor& at_features, int64_t wide) {
  ModelConfig c = student->config();
  const int64_t C = c.hidden_size;
  c.hidden_size = wide;  // head_dim and the heads stay: attention widths are the student's
  c.norm_eps *= static_cast<double>(C) / static_cast<double>(wide);
  Model t = create_model(c);
  auto from = student->named_parameters();
  torch::NoGradGuard g;
  for (auto& p : t->named_parameters()) {
    const std::string& n = p.key();
    const at::Tensor v = from[n];
    at::Tensor w = at::zeros_like(p.value());
    const Side side = side_of(n);
    if (side == Side::reads)
      w.index_copy_(1, at_features, v);
    else if (side == Side::writes)
      w.index_copy_(0, at_features, v);
    else if (side == Side::gain)
      w.index_copy_(0, at_features, v * std::sqrt(static_cast<double>(C) / static_cast<double>(wide)));
    else
      w.copy_(v);
    p.value().copy_(w);
  }
  return t;
}

TEST(ModuleTransfer, AlignmentFindsANarrowStudentsFeaturesInTheTeacher) {
  Model student = llama(2, 48, 3);
  auto gen = at::detail::createCPUGenerator(4);
  const at::Tensor at_features = at::randperm(64, gen, at::kLong).narrow(0, 0, 48).contiguous();
  Model teacher = widened(student, at_features, 64);
  {
    torch::NoGradGuard g;
    ModelInput in;
    in.input_ids = at::randint(5, teacher->config().vocab_size, {2, 10}, gen, at::kLong);
    EXPECT_CLOSE(teacher->hidden_states(in).index_select(-1, at_features), student->hidden_states(in), 1e-4)
        << "the construction: the teacher computes the student at those features";
  }
  const ModuleFiles m = random_module(teacher, lora({"q_proj", "v_proj", "down_proj"}), 12);
  TransferOptions pa;
  pa.method = "prune-align";
  const auto site_map = transfer_site_map(*teacher, *student, m.sites, pa);
  const std::vector<PairedBatch> batches = same_tokens(*teacher, gen);
  const Alignment a = measure_alignment(*teacher, *student, site_map, batches);
  const std::vector<int64_t> want(at_features.data_ptr<int64_t>(), at_features.data_ptr<int64_t>() + 48);
  for (int64_t l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l);
    EXPECT_EQ(a.at(p + ".self_attn.q_proj").input, want) << "the 48 live of the teacher's 64 features";
    EXPECT_GT(a.at(p + ".self_attn.q_proj").input_r, 0.999);
    EXPECT_TRUE(a.at(p + ".self_attn.q_proj").output.empty()) << "equal widths are not aligned";
    EXPECT_EQ(a.at(p + ".mlp.down_proj").output, want);
  }
  // A LoRA on the attention inputs (which read only live features) moves exactly.
  const ModuleFiles qv = random_module(teacher, lora({"q_proj", "v_proj"}), 13);
  const ModuleFiles moved = transfer_module(qv, *teacher, *student, pa, a);
  ModuleSet ts(teacher), ss(student);
  ts.attach(qv, "m", true), ss.attach(moved, "m", true);
  torch::NoGradGuard g;
  ModelInput in;
  in.input_ids = at::randint(5, teacher->config().vocab_size, {2, 10}, gen, at::kLong);
  EXPECT_CLOSE(student->forward(in), teacher->forward(in), 1e-4);
}

TEST(ModuleTransfer, MatchingPositionsCompareTokensWithoutWordMarkers) {
  const Tokenizer tok = Tokenizer::from_file(test::tiny_checkpoint("llama"));
  const std::vector<int64_t> a = tok.encode("the cat sat"), b = tok.encode("the dog sat");
  const int64_t T = static_cast<int64_t>(std::max(a.size(), b.size()));
  at::Tensor ia = at::zeros({1, T}, at::kLong), ib = at::zeros({1, T}, at::kLong);
  at::Tensor ma = at::zeros({1, T}, at::kLong), mb = at::zeros({1, T}, at::kLong);
  ia[0].narrow(0, 0, a.size()).copy_(at::tensor(a, at::kLong)), ma[0].narrow(0, 0, a.size()).fill_(1);
  ib[0].narrow(0, 0, b.size()).copy_(at::tensor(b, at::kLong)), mb[0].narrow(0, 0, b.size()).fill_(1);
  const at::Tensor keep = matching_positions(ia, ma, tok, ib, mb, tok);
  ASSERT_EQ(keep.size(1), T);
  EXPECT_TRUE(keep[0][0].item<bool>());  // "the" in both
  int64_t differ = 0;
  for (size_t p = 0; p < std::min(a.size(), b.size()); ++p) differ += a[p] != b[p];
  EXPECT_EQ(keep.sum().item<int64_t>(), static_cast<int64_t>(std::min(a.size(), b.size())) - differ);
  ma.fill_(0);
  EXPECT_EQ(matching_positions(ia, ma, tok, ib, mb, tok).sum().item<int64_t>(), 0) << "padding never pairs";
}

TEST(Correlation, PearsonAgainstItsDefinition) {
  auto gen = at::detail::createCPUGenerator(2);
  const at::Tensor a = at::randn({50, 3}, gen, at::kDouble), noise = at::randn({50, 1}, gen, at::kDouble);
  const at::Tensor b = at::cat(
      {a.narrow(1, 1, 1) * -2 + 1, a.narrow(1, 0, 1) + 0.5 * noise, at::ones({50, 1}, at::kDouble)}, 1);
  const at::Tensor r = fn::pearson_correlation(a, b);  // (3, 3)
  EXPECT_NEAR(r[1][0].item<double>(), -1.0, 1e-12);
  const at::Tensor x = a.select(1, 0) - a.select(1, 0).mean(), y = b.select(1, 1) - b.select(1, 1).mean();
  EXPECT_NEAR(r[0][1].item<double>(), ((x * y).sum() / (x.norm() * y.norm())).item<double>(), 1e-12);
  EXPECT_EQ(r[2][2].item<double>(), 0.0) << "a constant column correlates 0";
  EXPECT_THROW_WITH(fn::pearson_correlation(a, b.narrow(0, 0, 10)),
                    "[correlation] expects (N, p) and (N, q)");
}

}  // namespace
}  // namespace mdl
