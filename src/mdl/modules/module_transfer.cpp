#include "mdl/modules/module_transfer.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <set>

#include "mdl/core/error.h"
#include "mdl/core/site_recorder.h"
#include "mdl/modules/layer_copy.h"
#include "mdl/modules/module_type.h"
#include "mdl/ops/assignment.h"
#include "mdl/ops/correlation.h"
#include "mdl/tokenizers/tokenizer.h"

namespace mdl {
namespace {

bool all_digits(const std::string& s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](unsigned char c) { return std::isdigit(c); });
}

/// A token without its word marker: "▁x" and "Ġx" -> "x", "##x" -> "x".
std::string bare_token(std::string t) {
  for (const std::string marker : {"\xe2\x96\x81", "\xc4\xa0", "##"})
    if (t.rfind(marker, 0) == 0) return t.substr(marker.size());
  return t;
}

/// The rows of the student's and the teacher's activations at one site and batch that pair up: (n, F_S)
/// and (n, F_T). `keep` (B, P) marks the paired positions of (B, T, F) activations; undefined, every
/// position pairs (both as long). (B, F) activations (a pooled head's) pair by example.
std::pair<at::Tensor, at::Tensor> paired_rows(const at::Tensor& xs, const at::Tensor& xt,
                                              const at::Tensor& keep, const std::string& site) {
  MDL_CHECK(xs.dim() == xt.dim() && (xs.dim() == 2 || xs.dim() == 3) && xs.size(0) == xt.size(0),
            "[transfer] site '", site, "' records ", xs.sizes(), " in the student and ", xt.sizes(),
            " in the teacher; alignment needs (B, T, F) or (B, F) activations of the same examples");
  auto flat = [](const at::Tensor& x) { return x.reshape({-1, x.size(-1)}).to(at::kFloat).cpu(); };
  if (xs.dim() == 2) return {flat(xs), flat(xt)};
  if (!keep.defined()) {
    MDL_CHECK(xs.size(1) == xt.size(1), "[transfer] site '", site,
              "': the student's and the teacher's inputs ", "have different lengths (", xs.size(1), " vs ",
              xt.size(1), ") and no paired positions were given");
    return {flat(xs), flat(xt)};
  }
  const int64_t P = keep.size(1);
  MDL_CHECK(keep.size(0) == xs.size(0) && xs.size(1) >= P && xt.size(1) >= P, "[transfer] site '", site,
            "': ", keep.sizes(), " paired positions for activations ", xs.sizes(), " and ", xt.sizes());
  const at::Tensor k = keep.to(at::kBool).cpu();
  return {flat(xs).view({xs.size(0), xs.size(1), -1}).narrow(1, 0, P).index({k}),
          flat(xt).view({xt.size(0), xt.size(1), -1}).narrow(1, 0, P).index({k})};
}

/// Student feature i's teacher feature: the max-sum assignment of the correlations (d_S, d_T).
std::vector<int64_t> align(const at::Tensor& student_rows, const at::Tensor& teacher_rows, double* mean_r) {
  const at::Tensor r = fn::pearson_correlation(student_rows, teacher_rows);  // (d_S, d_T)
  std::vector<int64_t> to = fn::max_sum_assignment(r);
  double total = 0;
  for (size_t i = 0; i < to.size(); ++i) total += r[static_cast<int64_t>(i)][to[i]].item<double>();
  *mean_r = to.empty() ? std::nan("") : total / static_cast<double>(to.size());
  return to;
}

}  // namespace

std::vector<std::vector<int64_t>> transfer_layer_map(int64_t teacher_layers, int64_t student_layers,
                                                     const TransferOptions& o) {
  MDL_CHECK(o.method == "skip" || o.method == "avg" || o.method == "prune-align", "[transfer] method '",
            o.method, "' is unknown; expected skip, avg or prune-align");
  MDL_CHECK(teacher_layers > 0 && student_layers > 0,
            "[transfer] layer counts must be positive, got teacher ", teacher_layers, " and student ",
            student_layers);
  int64_t k = o.k;
  if (k == 0) {
    MDL_CHECK(teacher_layers % student_layers == 0, "[transfer] the teacher has ", teacher_layers,
              " layers and the student ", student_layers, ": no whole number of teacher layers per student ",
              "layer; give --k");
    k = teacher_layers / student_layers;
  }
  MDL_CHECK(k > 0, "[transfer] k must be positive, got ", k);
  const int64_t span = o.method == "avg" ? k : 1;
  MDL_CHECK(k * (student_layers - 1) + span <= teacher_layers, "[transfer] k = ", k, " maps student layer ",
            student_layers - 1, " to teacher layer ", k * (student_layers - 1) + span - 1,
            ", but the teacher has ", teacher_layers, " layers");
  std::vector<std::vector<int64_t>> map(static_cast<size_t>(student_layers));
  for (int64_t l = 0; l < student_layers; ++l)
    for (int64_t j = 0; j < span; ++j) map[static_cast<size_t>(l)].push_back(k * l + j);
  return map;
}

namespace {
/// Where `name`'s layer component starts and ends (npos, npos when it has none).
std::pair<size_t, size_t> layer_component(const std::string& name) {
  size_t start = 0;
  while (start <= name.size()) {
    const size_t end = std::min(name.find('.', start), name.size());
    if (all_digits(name.substr(start, end - start))) return {start, end};
    start = end + 1;
  }
  return {std::string::npos, std::string::npos};
}
}  // namespace

std::string site_in_layer(const std::string& site, int64_t to) {
  const auto [start, end] = layer_component(site);
  return start == std::string::npos ? site : site.substr(0, start) + std::to_string(to) + site.substr(end);
}

int64_t layer_in_name(const std::string& name) {
  const auto [start, end] = layer_component(name);
  return start == std::string::npos ? -1 : std::stoll(name.substr(start, end - start));
}

at::Tensor matching_positions(const at::Tensor& teacher_ids, const at::Tensor& teacher_mask,
                              const Tokenizer& teacher_tokenizer, const at::Tensor& student_ids,
                              const at::Tensor& student_mask, const Tokenizer& student_tokenizer) {
  MDL_CHECK(teacher_ids.dim() == 2 && student_ids.dim() == 2 && teacher_ids.size(0) == student_ids.size(0),
            "[transfer] expects (B, T) token ids of the same texts, got ", teacher_ids.sizes(), " and ",
            student_ids.sizes());
  const int64_t B = teacher_ids.size(0), P = std::min(teacher_ids.size(1), student_ids.size(1));
  const at::Tensor ti = teacher_ids.cpu().contiguous(), si = student_ids.cpu().contiguous();
  const at::Tensor tm = teacher_mask.cpu().to(at::kLong).contiguous(),
                   sm = student_mask.cpu().to(at::kLong).contiguous();
  at::Tensor keep = at::zeros({B, P}, at::kBool);
  auto k = keep.accessor<bool, 2>();
  auto ta = ti.accessor<int64_t, 2>(), sa = si.accessor<int64_t, 2>();
  auto tma = tm.accessor<int64_t, 2>(), sma = sm.accessor<int64_t, 2>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < P; ++p)
      k[b][p] = tma[b][p] != 0 && sma[b][p] != 0 &&
                bare_token(teacher_tokenizer.id_to_token(ta[b][p])) ==
                    bare_token(student_tokenizer.id_to_token(sa[b][p]));
  return keep;
}

std::vector<std::pair<std::string, std::vector<std::string>>> transfer_site_map(
    const ModelImpl& teacher, const ModelImpl& student, const std::vector<std::string>& sites,
    const TransferOptions& o) {
  MDL_CHECK(teacher.config().architecture == student.config().architecture, "[transfer] the teacher is a ",
            teacher.config().architecture, " and the student a ", student.config().architecture,
            "; modules move between models of one family");
  const auto map = transfer_layer_map(teacher.config().n_layer, student.config().n_layer, o);
  const std::set<std::string> covered(sites.begin(), sites.end());
  std::vector<std::pair<std::string, std::vector<std::string>>> out;
  for (const auto& s : student.sites()) {
    const SiteInfo& info = s->info();
    std::vector<std::string> from;
    if (info.layer < 0) {
      if (covered.count(info.name)) from.push_back(info.name);
    } else {
      for (int64_t t : map.at(static_cast<size_t>(info.layer))) {
        const std::string name = site_in_layer(info.name, t);
        const Site* ts = teacher.find_site(name);
        if (ts == nullptr || !covered.count(name)) break;
        MDL_CHECK(ts->info().layer == t && ts->info().kind == info.kind, "[transfer] the teacher's site '",
                  name, "' is not layer ", t, "'s counterpart of the student's '", info.name, "'");
        from.push_back(name);
      }
      if (!from.empty() && from.size() < map.at(static_cast<size_t>(info.layer)).size()) {
        MDL_FAIL("[transfer] avg needs the module at every teacher layer of student layer ", info.layer, " (",
                 map.at(static_cast<size_t>(info.layer)).size(), " of them), but it has no part at '",
                 site_in_layer(info.name, map.at(static_cast<size_t>(info.layer))[from.size()]), "'");
      }
    }
    if (!from.empty()) out.emplace_back(info.name, std::move(from));
  }
  MDL_CHECK(!out.empty(), "[transfer] none of the module's ", sites.size(), " sites (e.g. '",
            sites.empty() ? "" : sites.front(), "') has a counterpart in the student");
  return out;
}

Alignment measure_alignment(ModelImpl& teacher, ModelImpl& student,
                            const std::vector<std::pair<std::string, std::vector<std::string>>>& site_map,
                            const std::vector<PairedBatch>& batches, bool equal_widths) {
  MDL_CHECK(!batches.empty(), "[transfer] prune-align needs data: no batches to measure activations on");
  torch::NoGradGuard no_grad;
  std::vector<Site*> ts, ss;
  for (const auto& [s, from] : site_map)
    ss.push_back(&student.site(s)), ts.push_back(&teacher.site(from.at(0)));
  const SiteRecorder::Options both{true, true};
  SiteRecorder tr(ts, both), sr(ss, both);
  const bool teacher_training = teacher.is_training(), student_training = student.is_training();
  teacher.eval(), student.eval();
  for (const auto& b : batches) teacher.forward(b.teacher), student.forward(b.student);
  teacher.train(teacher_training), student.train(student_training);
  Alignment out;
  for (size_t i = 0; i < site_map.size(); ++i) {
    const std::string& s = site_map[i].first;
    const std::string& t = site_map[i].second.at(0);
    const SiteInfo &si = student.site(s).info(), &ti = teacher.site(t).info();
    FeatureMap m;
    auto side = [&](bool input, int64_t ws, int64_t wt, std::vector<int64_t>& to, double& r) {
      if (ws == wt && !equal_widths) return;
      MDL_CHECK(ws <= wt, "[transfer] the student's site '", s, "' is wider than the teacher's (", ws, " vs ",
                wt, input ? " input" : " output", " features); features can only be dropped");
      const auto& rs = input ? sr.inputs(s) : sr.outputs(s);
      const auto& rt = input ? tr.inputs(t) : tr.outputs(t);
      MDL_CHECK(rs.size() == batches.size() && rt.size() == batches.size(), "[transfer] sites '", s,
                "' and '", t, "' ran ", rs.size(), " and ", rt.size(), " times over ", batches.size(),
                " batches; expected once per batch");
      std::vector<at::Tensor> xs, xt;
      for (size_t b = 0; b < batches.size(); ++b) {
        auto [a, c] = paired_rows(rs[b], rt[b], batches[b].keep, s);
        xs.push_back(a), xt.push_back(c);
      }
      const at::Tensor all_s = at::cat(xs), all_t = at::cat(xt);
      MDL_CHECK(all_s.size(0) >= 2, "[transfer] only ", all_s.size(0), " positions pair up between the ",
                "teacher's and the student's tokens at '", s, "'; alignment needs at least 2 (more data, or ",
                "models sharing a tokenizer)");
      to = align(all_s, all_t, &r);
    };
    side(true, si.in_features, ti.in_features, m.input, m.input_r);
    side(false, si.out_features, ti.out_features, m.output, m.output_r);
    out[s] = std::move(m);
  }
  return out;
}

ModuleFiles transfer_module(const ModuleFiles& module, const ModelImpl& teacher, const ModelImpl& student,
                            const TransferOptions& o, const Alignment& alignment, nlohmann::json* report) {
  const ModuleType& type = module_type(module.config.type);
  const int64_t dt = teacher.config().hidden_size, ds = student.config().hidden_size;
  MDL_CHECK(type.feature_axes, "[transfer] a ", type.name,
            " module's parameters do not lie along its sites' features (teacher hidden size ", dt,
            ", student ", ds,
            "), so it cannot be moved; module types that move: lora, ia3, adapter, bitfit, "
            "layernorm");
  const auto site_map = transfer_site_map(teacher, student, module.sites, o);
  ModuleFiles out;
  out.format = module.format;
  out.config = module.config;
  if (dt != ds && type.options_for_width) type.options_for_width(out.config, dt, ds);
  // Each tensor's site: the longest module site its name starts with.
  std::map<std::string, std::map<std::string, at::Tensor>> by_site;  // site -> parameter -> tensor
  for (const auto& [key, value] : module.tensors) {
    std::string best;
    for (const auto& s : module.sites)
      if (key.size() > s.size() + 1 && key.compare(0, s.size(), s) == 0 && key[s.size()] == '.' &&
          s.size() > best.size())
        best = s;
    MDL_CHECK(!best.empty(), "[transfer] tensor '", key, "' belongs to none of the module's sites");
    by_site[best][key.substr(best.size() + 1)] = value;
  }
  nlohmann::json sites = nlohmann::json::array();
  std::set<std::string> used;
  for (const auto& [s, from] : site_map) {
    const SiteInfo& si = student.site(s).info();
    const SiteInfo& ti = teacher.site(from.at(0)).info();
    const auto fm = alignment.find(s);
    nlohmann::json row = {{"student", s}, {"teacher", from}};
    for (const auto& [param, first] : by_site.at(from.at(0))) {
      // The layers' values: skip's one, or avg's mean (or the paper code's sum of all but the last over k).
      at::Tensor v = first.to(at::kDouble);
      const size_t n = from.size();
      for (size_t j = 1; j < n; ++j) {
        const auto& other = by_site.at(from[j]);
        const auto it = other.find(param);
        MDL_CHECK(it != other.end() && it->second.sizes() == first.sizes(), "[transfer] avg: '", from[j], ".",
                  param, "' is missing or not shaped like '", from[0], ".", param, "' ", first.sizes());
        if (!o.avg_reference || j + 1 < n) v = v + it->second.to(at::kDouble);
      }
      if (n > 1) v = v / static_cast<double>(n);
      const bool copy =
          std::any_of(module.config.modules_to_save.begin(), module.config.modules_to_save.end(),
                      [&](const std::string& m) { return name_matches_suffix(from.at(0), m); });
      const std::string axes =
          copy ? layer_copy_axes(param) : type.feature_axes(module.config, from.at(0), param);
      MDL_CHECK(static_cast<int64_t>(axes.size()) == v.dim(), "[transfer] '", from[0], ".", param,
                "' has shape ", v.sizes(), "; a ", type.name, " module's ", param, " has ", axes.size(),
                " axes");
      for (int64_t a = 0; a < v.dim(); ++a) {
        const char side = axes[static_cast<size_t>(a)];
        if (side == '-') continue;
        const int64_t want = side == 'i' ? si.in_features : si.out_features;
        const int64_t have = side == 'i' ? ti.in_features : ti.out_features;
        MDL_CHECK(v.size(a) == have, "[transfer] '", from[0], ".", param, "' axis ", a, " has ", v.size(a),
                  " entries; the teacher's site has ", have, side == 'i' ? " input" : " output", " features");
        const std::vector<int64_t>* idx = nullptr;
        if (fm != alignment.end()) idx = side == 'i' ? &fm->second.input : &fm->second.output;
        if (idx != nullptr && !idx->empty()) {
          MDL_CHECK(static_cast<int64_t>(idx->size()) == want, "[transfer] the alignment of '", s, "' maps ",
                    idx->size(), side == 'i' ? " input" : " output", " features; the student's site has ",
                    want);
          for (int64_t j : *idx)
            MDL_CHECK(j >= 0 && j < have, "[transfer] the alignment of '", s, "' names teacher feature ", j,
                      " of ", have);
          v = v.index_select(a, at::tensor(*idx, at::kLong));
          row["sliced"][param].push_back({a, have, want});
        } else {
          MDL_CHECK(have == want, "[transfer] '", s, "' has ", want, side == 'i' ? " input" : " output",
                    " features and the teacher's '", from[0], "' ", have,
                    ": the widths differ, so the features need aligning (--method prune-align with --data)");
        }
      }
      out.tensors[s + "." + param] = v.to(first.scalar_type());
    }
    if (fm != alignment.end()) {
      if (!std::isnan(fm->second.input_r)) row["input_correlation"] = fm->second.input_r;
      if (!std::isnan(fm->second.output_r)) row["output_correlation"] = fm->second.output_r;
    }
    for (const auto& t : from) used.insert(t);
    out.sites.push_back(s);
    sites.push_back(std::move(row));
  }
  if (report) {
    nlohmann::json unused = nlohmann::json::array();
    for (const auto& s : module.sites)
      if (!used.count(s)) unused.push_back(s);
    *report = {{"method", o.method},
               {"avg_reference", o.avg_reference},
               {"type", module.config.type},
               {"format", module.format},
               {"teacher", {{"layers", teacher.config().n_layer}, {"hidden_size", dt}}},
               {"student", {{"layers", student.config().n_layer}, {"hidden_size", ds}}},
               {"layer_map", transfer_layer_map(teacher.config().n_layer, student.config().n_layer, o)},
               {"sites", sites},
               {"unused_teacher_sites", unused}};
  }
  return out;
}

}  // namespace mdl
