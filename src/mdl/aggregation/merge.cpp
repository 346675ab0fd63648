#include "mdl/aggregation/merge.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <algorithm>
#include <filesystem>
#include <map>

#include "mdl/backbones/model.h"
#include "mdl/core/error.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/checkpoint.h"
#include "mdl/io/safetensors.h"
#include "mdl/modules/adapterhub_format.h"
#include "mdl/modules/module_set.h"
#include "mdl/modules/peft_format.h"

namespace mdl {
namespace fs = std::filesystem;

bool is_module_dir(const std::string& dir) {
  return !module_format(dir).empty();
}

MergeReport merge_checkpoints(const std::vector<std::string>& inputs, const std::string& base,
                              const MergeOptions& o, const std::string& out) {
  validate(o, inputs.size());
  MDL_CHECK(o.method != "cat" && o.method != "svd", "[merge] '", o.method,
            "' merges LoRA modules; for checkpoints use ",
            "linear, task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune or slerp");
  torch::NoGradGuard no_grad;
  std::vector<std::unique_ptr<io::CheckpointReader>> readers;
  for (const auto& dir : inputs) readers.push_back(std::make_unique<io::CheckpointReader>(dir));
  std::unique_ptr<io::CheckpointReader> base_reader;
  if (!base.empty()) base_reader = std::make_unique<io::CheckpointReader>(base);
  const std::vector<std::string> names = readers[0]->names();
  std::vector<io::TensorEntry> entries;
  for (const auto& name : names) {
    const auto shape = readers[0]->shape(name);
    for (size_t i = 1; i < readers.size(); ++i) {
      MDL_CHECK(readers[i]->contains(name), "[merge] '", inputs[i], "' has no tensor '", name, "' (",
                inputs[0], " has); are they fine-tunes of the same base model?");
      MDL_CHECK(readers[i]->shape(name) == shape, "[merge] tensor '", name, "' is ",
                shape_str(readers[i]->shape(name)), " in '", inputs[i], "' but ", shape_str(shape), " in '",
                inputs[0], "'");
    }
    MDL_CHECK(!base_reader || base_reader->contains(name), "[merge] the base '", base, "' has no tensor '",
              name, "'");
    entries.push_back({name, readers[0]->dtype(name), shape, 0, 0});
  }
  for (size_t i = 1; i < readers.size(); ++i)
    MDL_CHECK(readers[i]->names().size() == names.size(), "[merge] '", inputs[i], "' has ",
              readers[i]->names().size(), " tensors, '", inputs[0], "' has ", names.size());
  io::AtomicDirectory staged(out);  // the merged checkpoint whole, or the old one as it was
  MergeReport report;
  report.format = "checkpoint";
  io::SafetensorsWriter writer((fs::path(staged.path()) / "model.safetensors").string(), entries,
                               {{"format", "pt"}, {"merged_by", "mdl merge " + o.method}});
  for (const auto& name : names) {   // one tensor at a time: bounded memory
    std::vector<at::Tensor> values;  // zero-copy views of the mappings, released after use
    for (const auto& r : readers) values.push_back(r->tensor(name));
    at::Tensor b = base_reader ? base_reader->tensor(name) : at::Tensor();
    merge_tensors_into(values, b, o, name, [&](const at::Tensor& block) {  // never the whole result in memory
      writer.write_part(block);
      report.output_bytes += block.numel() * block.element_size();
    });
    for (const auto& r : readers) r->release(name);
    if (base_reader) base_reader->release(name);
    ++report.tensors;
  }
  writer.commit();
  io::copy_side_files(inputs[0], staged.path(), /*config=*/true);
  fs::remove(fs::path(staged.path()) / "model.safetensors.index.json");  // a single file now
  staged.commit();
  return report;
}

MergeReport merge_modules(const std::string& model_dir, const std::vector<std::string>& inputs,
                          const MergeOptions& o, const std::string& out) {
  validate(o, inputs.size());
  torch::NoGradGuard no_grad;
  ModuleSet set(load_model(model_dir));
  std::vector<std::string> names;
  for (size_t i = 0; i < inputs.size(); ++i)
    names.push_back(set.load(inputs[i], "input" + std::to_string(i)));
  const ModuleConfig& first = set.config(names[0]);
  for (size_t i = 1; i < names.size(); ++i)
    MDL_CHECK(set.config(names[i]).type == first.type, "[merge] '", inputs[i], "' is a ",
              set.config(names[i]).type, " module but '", inputs[0], "' is a ", first.type,
              "; merge modules of one type");
  MergeReport report;
  report.format = module_format(inputs[0]);
  auto weight = [&](size_t i) { return o.weights.empty() ? 1.0 : o.weights[i]; };
  std::map<std::string, at::Tensor> tensors;
  ModuleConfig config;
  // Whole layers trained with the modules (modules_to_save: heads) merge as task vectors against the base
  // layer, whatever the modules' type; every input must have the same ones.
  auto copies_of = [&](const std::string& n) {
    std::vector<std::string> out;
    for (const auto& s : set.sites(n))
      if (set.module_at(n, s)->type() == "modules_to_save") out.push_back(s);
    return out;
  };
  const std::vector<std::string> copies = copies_of(names[0]);
  for (size_t i = 1; i < names.size(); ++i)
    MDL_CHECK(copies_of(names[i]) == copies, "[merge] '", inputs[i], "' trains other whole layers ",
              "(modules_to_save) than '", inputs[0], "'; merged modules need the same ones");
  auto is_copy = [&](const std::string& site) {
    return std::find(copies.begin(), copies.end(), site) != copies.end();
  };
  for (const auto& site : copies) {
    SiteLinearImpl& base = set.model()->linear(site);
    for (const auto& [param, b] :
         {std::pair<std::string, at::Tensor>{"weight", base.weight}, {"bias", base.bias}}) {
      if (!b.defined()) continue;
      const std::string key = site + "." + param;
      std::vector<at::Tensor> values;
      for (const auto& n : names) values.push_back(set.tensors(n).at(key));
      tensors[key] = merge_tensors(values, b, o, key);
    }
  }
  if (first.type == "lora") {
    // Each input's parts by site, and the union of their sites in forward order.
    std::vector<std::map<std::string, std::shared_ptr<LoraImpl>>> parts(names.size());
    bool dora = false;
    int64_t max_rank = 0;
    for (size_t i = 0; i < names.size(); ++i) {
      dora = dora || set.config(names[i]).lora.use_dora;
      for (const auto& s : set.sites(names[i])) {
        if (is_copy(s)) continue;
        auto lora = std::dynamic_pointer_cast<LoraImpl>(set.module_at(names[i], s));
        parts[i][s] = lora;
        max_rank = std::max(max_rank, lora->rank);
      }
    }
    std::vector<std::string> sites;
    for (const auto& site_ptr : set.model()->sites())
      if (std::any_of(parts.begin(), parts.end(),
                      [&](const auto& p) { return p.count(site_ptr->name()) > 0; }))
        sites.push_back(site_ptr->name());
    config.type = "lora";
    MDL_CHECK(!dora || o.method != "cat",
              "[merge] cat is exact only for plain LoRA: DoRA's magnitude rescales the "
              "whole delta; use svd or another method for DoRA inputs");
    std::map<std::string, int64_t> site_rank;
    for (const auto& site : sites) {
      std::vector<LoraFactors> factors;
      std::vector<double> w;
      std::vector<at::Tensor> deltas, magnitudes;
      std::vector<double> magnitude_weights;
      const SiteInfo& info = set.model()->site(site).info();
      for (size_t i = 0; i < names.size(); ++i) {
        auto it = parts[i].find(site);
        if (it == parts[i].end()) {  // this input does not change this site: a zero task vector
          deltas.push_back(at::zeros({info.out_features, info.in_features}));
          continue;
        }
        const auto& lora = it->second;
        factors.push_back({lora->A, lora->B, lora->scaling});
        w.push_back(weight(i));
        deltas.push_back(lora->delta_weight().to(at::kFloat));
        if (lora->magnitude.defined())
          magnitudes.push_back(lora->magnitude.to(at::kFloat)), magnitude_weights.push_back(weight(i));
      }
      LoraFactors merged;
      if (o.method == "cat") {
        merged = lora_cat(factors, w);
      } else {
        MergeOptions on_deltas = o;
        if (o.method == "svd")
          on_deltas.method = "linear", on_deltas.normalize = false;  // the weighted sum, factorised
        at::Tensor delta = merge_tensors(deltas, at::Tensor(), on_deltas, site);
        SvdFactors f = lora_svd(delta, o.rank > 0 ? o.rank : max_rank);
        merged = f.factors;
        report.max_discarded_energy = std::max(report.max_discarded_energy, f.discarded_energy);
        report.max_svd_error = std::max(report.max_svd_error, f.error);
      }
      const int64_t r = merged.A.size(0);
      site_rank[site] = r;
      report.rank = std::max(report.rank, r);
      tensors[site + ".lora_A"] = merged.A;
      tensors[site + ".lora_B"] = merged.B;
      if (dora) {  // DoRA: the magnitudes' weighted average (an approximation: documented)
        MDL_CHECK(!magnitudes.empty(), "[merge] internal: DoRA site without magnitude");
        at::Tensor m = at::zeros_like(magnitudes[0]);
        double sum = 0;
        for (size_t i = 0; i < magnitudes.size(); ++i)
          m += magnitude_weights[i] * magnitudes[i], sum += magnitude_weights[i];
        tensors[site + ".lora_magnitude_vector"] = m / sum;
      }
    }
    config.lora.r = report.rank;
    config.lora.alpha =
        static_cast<double>(report.rank);  // scaling 1: every weight and scaling is in B already
    config.lora.use_dora = dora;
    for (const auto& [site, r] : site_rank)
      if (r != report.rank) {
        config.lora.rank_pattern[exact_sites_regex({site})] = r;
        config.lora.alpha_pattern[exact_sites_regex({site})] = static_cast<double>(r);
      }
    config.targets.target_regex = exact_sites_regex(sites);
    config.modules_to_save = first.modules_to_save;
  } else {
    MDL_CHECK(o.method != "cat" && o.method != "svd", "[merge] '", o.method, "' merges LoRA factors; '",
              inputs[0], "' is a ", first.type, " module");
    for (size_t i = 1; i < names.size(); ++i)
      MDL_CHECK(set.sites(names[i]) == set.sites(names[0]), "[merge] '", inputs[i],
                "' covers other sites than '", inputs[0], "'; parameter-wise merging needs the same sites");
    config = first;
    config.targets = TargetOptions();
    config.targets.target_regex = exact_sites_regex(set.sites(names[0]));
    auto t0 = set.tensors(names[0]);
    for (const auto& [key, value] : t0) {
      if (tensors.count(key)) continue;  // a whole layer's, merged above
      std::vector<at::Tensor> values;
      for (const auto& n : names) values.push_back(set.tensors(n).at(key));
      tensors[key] = merge_tensors(values, at::Tensor(), o, key);
    }
  }
  config.labels = set.labels(names);  // the inputs' labels, which must agree
  for (const auto& n : names) set.remove(n);
  set.add("merged", config);
  set.load_tensors("merged", tensors, "the merge of " + std::to_string(inputs.size()) + " modules");
  set.save("merged", out, report.format);
  report.tensors = static_cast<int64_t>(tensors.size());
  for (const auto& [k, t] : tensors) report.output_bytes += t.numel() * t.element_size();
  return report;
}

}  // namespace mdl
