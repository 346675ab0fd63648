// Trainer checkpoints: the trained modules, the backbone when it trains, the optimiser's moments under
// stable keys and the step, written beside and swapped in whole; read back with every field checked.
#include <ATen/ATen.h>
#include <torch/optim/adamw.h>
#include <torch/utils.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/json_file.h"
#include "mdl/io/safetensors.h"
#include "mdl/modules/module_set.h"
#include "mdl/training/trainer.h"
#include "mdl/training/trainer_state.h"

namespace mdl {
namespace fs = std::filesystem;

void Trainer::save_checkpoint(const std::string& dir) const {
  const std::string tmp = dir + ".tmp";
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  for (const auto& name : trainable_) set_.save(name, (fs::path(tmp) / "modules" / name).string());
  if (options_.train_base) {
    std::map<std::string, at::Tensor> base;
    for (const auto& p : set_.model()->named_parameters()) base[p.key()] = p.value();
    io::save_safetensors((fs::path(tmp) / "base.safetensors").string(), base);
  }
  std::map<std::string, at::Tensor> moments;
  const auto& states = state_->optimizer->state();
  for (size_t i = 0; i < state_->params.size(); ++i) {
    auto it = states.find(c10::guts::to_string(state_->params[i].unsafeGetTensorImpl()));
    if (it == states.end()) continue;  // no step taken yet
    const auto& s = static_cast<const torch::optim::AdamWParamState&>(*it->second);
    moments[state_->keys[i] + ".exp_avg"] = s.exp_avg();
    moments[state_->keys[i] + ".exp_avg_sq"] = s.exp_avg_sq();
    moments[state_->keys[i] + ".step"] = at::tensor(s.step(), at::kLong);
  }
  io::save_safetensors((fs::path(tmp) / "optimizer.safetensors").string(), moments);
  nlohmann::json j = {{"step", step_},
                      {"options", options_},
                      {"modules", trainable_},
                      {"best", std::isnan(best_) ? nlohmann::json(nullptr) : nlohmann::json(best_)},
                      {"evals_since_best", evals_since_best_}};
  io::write_text_atomic((fs::path(tmp) / "trainer.json").string(), j.dump(2) + "\n");
  // Swap the complete directory in: a crash leaves either the old checkpoint or the new one.
  const std::string old = dir + ".old";
  fs::remove_all(old);
  if (fs::exists(dir)) fs::rename(dir, old);
  fs::rename(tmp, dir);
  fs::remove_all(old);
}

std::string find_checkpoint(const std::string& dir) {
  for (const std::string& d : {dir, dir + ".old"})
    if (fs::exists(fs::path(d) / "trainer.json")) return d;
  return "";
}

void Trainer::load_checkpoint(const std::string& requested) {
  const std::string dir = find_checkpoint(requested);
  MDL_CHECK(!dir.empty(), "[train] '", requested, "' is not a checkpoint (no trainer.json)");
  const fs::path meta = fs::path(dir) / "trainer.json";
  const nlohmann::json j = io::read_json(meta.string());
  // Every field is checked before anything is restored: a checkpoint is a file anyone can edit.
  const std::string where = "[train] checkpoint '" + meta.string() + "': ";
  MDL_CHECK(j.is_object(), where, "must hold a JSON object");
  MDL_CHECK(j.contains("modules") && j["modules"].is_array() &&
                std::all_of(j["modules"].begin(), j["modules"].end(),
                            [](const nlohmann::json& m) { return m.is_string(); }),
            where, "field 'modules' must be a list of module names");
  MDL_CHECK(j["modules"].get<std::vector<std::string>>() == trainable_, where, "trains ", j["modules"].dump(),
            ", this run trains other modules");
  MDL_CHECK(j.contains("step") && j["step"].is_number_integer(), where, "field 'step' must be an integer");
  const int64_t step = j["step"].get<int64_t>();
  MDL_CHECK(step >= 0 && step <= options_.steps, where, "field 'step' is ", step,
            "; a checkpoint of this run is at a "
            "step in 0..",
            options_.steps, " (options.steps)");
  MDL_CHECK(!j.contains("best") || j["best"].is_null() ||
                (j["best"].is_number() && std::isfinite(j["best"].get<double>())),
            where, "field 'best' must be a finite number or null");
  MDL_CHECK(!j.contains("evals_since_best") ||
                (j["evals_since_best"].is_number_integer() && j["evals_since_best"].get<int64_t>() >= 0),
            where, "field 'evals_since_best' must be an integer >= 0");
  for (const auto& name : trainable_) {
    const std::string mdir = (fs::path(dir) / "modules" / name).string();
    set_.load_tensors(name, io::load_safetensors((fs::path(mdir) / "module.safetensors").string()), mdir);
  }
  if (options_.train_base) {
    const std::string file = (fs::path(dir) / "base.safetensors").string();
    MDL_CHECK(fs::exists(file), "[train] checkpoint '", dir,
              "' has no backbone weights, but this run trains the backbone");
    auto base = io::load_safetensors(file);
    torch::NoGradGuard no_grad;
    for (auto& p : set_.model()->named_parameters()) {
      auto it = base.find(p.key());
      MDL_CHECK(it != base.end() && it->second.sizes() == p.value().sizes(), "[train] checkpoint '", file,
                "' lacks backbone tensor '", p.key(), "' or its shape differs");
      p.value().copy_(it->second);
    }
  }
  auto moments = io::load_safetensors((fs::path(dir) / "optimizer.safetensors").string());
  auto& states = state_->optimizer->state();
  for (size_t i = 0; i < state_->params.size(); ++i) {
    const std::string& k = state_->keys[i];
    if (!moments.count(k + ".exp_avg")) continue;
    for (const char* part : {".exp_avg", ".exp_avg_sq"}) {
      MDL_CHECK(moments.count(k + part) && moments.at(k + part).sizes() == state_->params[i].sizes() &&
                    at::isFloatingType(moments.at(k + part).scalar_type()),
                "[train] checkpoint '", dir, "/optimizer.safetensors': '", k, part,
                "' is missing or not a floating "
                "tensor of shape ",
                shape_str(state_->params[i].sizes().vec()));
    }
    MDL_CHECK(moments.count(k + ".step") && moments.at(k + ".step").numel() == 1 &&
                  moments.at(k + ".step").item<double>() >= 0,
              "[train] checkpoint '", dir, "/optimizer.safetensors': '", k, ".step' must be one number >= 0");
    auto s = std::make_unique<torch::optim::AdamWParamState>();
    s->exp_avg(moments.at(k + ".exp_avg").clone());
    s->exp_avg_sq(moments.at(k + ".exp_avg_sq").clone());
    s->step(moments.at(k + ".step").item<int64_t>());
    states[c10::guts::to_string(state_->params[i].unsafeGetTensorImpl())] = std::move(s);
  }
  step_ = step;
  best_ = j.contains("best") && j["best"].is_number() ? j["best"].get<double>()
                                                      : std::numeric_limits<double>::quiet_NaN();
  evals_since_best_ = j.value("evals_since_best", int64_t{0});
}

}  // namespace mdl
