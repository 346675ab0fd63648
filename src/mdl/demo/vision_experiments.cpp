// Experiments 1-6 of the demo, on images: a ViT pretrained on Fashion-MNIST, then transfer, continual
// learning, multi-task routing, mixture of experts and merging on top of it.
#include <ATen/ATen.h>
#include <torch/torch.h>

#include <cmath>
#include <filesystem>
#include <numeric>

#include "mdl/aggregation/merge.h"
#include "mdl/backbones/moe_convert.h"
#include "mdl/core/error.h"
#include "mdl/core/hash.h"
#include "mdl/core/log.h"
#include "mdl/demo/demo_context.h"
#include "mdl/io/atomic_file.h"
#include "mdl/modules/module_set.h"
#include "mdl/modules/module_type.h"
#include "mdl/report/plot.h"
#include "mdl/routing/routing_log.h"
#include "mdl/routing/specialisation.h"

namespace fs = std::filesystem;

namespace mdl::demo {
namespace {

const std::vector<std::string>& kFashion = fashion_classes();
const std::vector<std::string> kDigits = {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"};
constexpr int kTasks = 5;

ModelConfig vit_config(const Sizes& s) {
  const ModelConfig c =
      fashion_vit_config(s.vit_hidden, s.vit_layers, s.vit_heads, s.vit_intermediate, s.vit_patch);
  nlohmann::json j = nlohmann::json::parse(model_config_to_json(c));  // class names in config.json
  for (size_t i = 0; i < kFashion.size(); ++i) {
    j["id2label"][std::to_string(i)] = kFashion[i];
    j["label2id"][kFashion[i]] = i;
  }
  return parse_model_config(j.dump(), "demo ViT config");
}

/// Rows of `set` whose class is a or b, relabelled 0 / 1 when `binary`.
ImageSet pair(const ImageSet& set, int64_t a, int64_t b, bool binary) {
  at::Tensor rows = ((set.labels == a) | (set.labels == b)).nonzero().squeeze(1);
  ImageSet out = set.select(rows);
  if (binary) out.labels = (out.labels == b).to(at::kLong);
  return out;
}

Dataset dataset(const ImageSet& set, const std::vector<std::string>& names, const std::string& task = "") {
  return image_dataset(set.images, set.labels, names, task);
}

/// One dataset of several tasks' data (task ids follow the order of `parts`).
Dataset concat(const std::vector<Dataset>& parts) {
  Dataset out;
  out.labels = parts.at(0).labels;
  std::vector<at::Tensor> images;
  int64_t offset = 0;
  for (const auto& p : parts) {
    for (auto e : p.examples) {
      e.image += offset;
      out.examples.push_back(e);
    }
    for (const auto& t : p.tasks) out.tasks.push_back(t);
    images.push_back(p.images);
    offset += p.images.size(0);
  }
  out.images = at::cat(images);
  return out;
}

Model load_vit(const Context& ctx, const std::string& dir) {
  LoadOptions load;
  load.device = ctx.device;
  return load_model(dir, load);
}

ModuleConfig lora(int64_t r, std::vector<std::string> targets, uint64_t seed) {
  ModuleConfig c;
  c.type = "lora";
  c.lora.r = r;
  c.lora.alpha = 2.0 * static_cast<double>(r);
  c.targets.target_modules = std::move(targets);
  c.seed = seed;
  return c;
}

ModuleConfig adapter(int64_t reduction, uint64_t seed) {
  ModuleConfig c;
  c.type = "adapter";
  c.adapter.config = "pfeiffer";
  c.adapter.reduction_factor = reduction;
  c.adapter.non_linearity = "gelu";
  c.targets = module_type("adapter").default_targets(Arch::vit, c);
  c.seed = seed;
  return c;
}

nlohmann::json matrix_json(const std::vector<std::vector<double>>& m) {
  nlohmann::json out = nlohmann::json::array();
  for (const auto& row : m) {
    nlohmann::json r = nlohmann::json::array();
    for (double v : row) r.push_back(std::isnan(v) ? nlohmann::json(nullptr) : nlohmann::json(v));
    out.push_back(r);
  }
  return out;
}

double mean(const std::vector<double>& v) {
  return v.empty() ? std::nan("") : std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
}

std::string pct(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.1f%%", 100 * v);
  return buf;
}

// ---- 1. the backbone ----

/// Trains (or loads from the cache) the ViT; returns its directory.
std::string pretrain_vit(Context& ctx, const ImageSet& train_set, const ImageSet& test) {
  const Sizes& s = ctx.sizes;
  const std::string dir = vit_cache_path(ctx);
  nlohmann::json info;
  bool cached = !ctx.options.no_cache && cache_complete(dir);
  if (cached) {
    info = nlohmann::json::parse(io::read_text((fs::path(dir) / "pretrain.json").string()));
  } else {
    const auto start = std::chrono::steady_clock::now();
    Model model = create_model(vit_config(s));
    model->init_weights(ctx.options.seed);
    model->to(ctx.device);
    ModuleSet set(model);
    const Dataset data = dataset(sample(train_set, s.pretrain_examples, ctx.options.seed + 1), kFashion);
    auto history = train(ctx, set, {}, train_options(ctx, s.pretrain_steps, 2e-3, s.batch, true), data,
                         "pretraining the ViT on Fashion-MNIST");
    const Dataset eval = dataset(test, kFashion);
    info["test_accuracy"] = accuracy(predict_logits(*model, eval), labels_of(eval));
    info["seconds"] = seconds_since(start);
    info["steps"] = s.pretrain_steps;
    info["examples"] = data.examples.size();
    info["loss"] = losses(history);
    info["parameters"] = model->num_parameters();
    write_dir_atomic(dir, [&](const std::string& tmp) {
      save_model(*model, tmp);
      io::write_text_atomic((fs::path(tmp) / "pretrain.json").string(), info.dump() + "\n");
    });
  }
  ctx.results["vision_backbone"] = {{"config", nlohmann::json::parse(model_config_to_json(vit_config(s)))},
                                    {"test_accuracy", info["test_accuracy"]},
                                    {"test_examples", test.size()},
                                    {"parameters", info["parameters"]},
                                    {"pretrain_steps", info["steps"]},
                                    {"pretrain_examples", info["examples"]},
                                    {"pretrain_seconds", info["seconds"]},
                                    {"cached", cached},
                                    {"path", dir}};
  PlotOptions plot;
  plot.title = "ViT pretraining on Fashion-MNIST";
  plot.x_label = "step", plot.y_label = "training loss";
  write_line_plot((fs::path(ctx.figures_dir) / "vit_pretraining_loss.svg").string(),
                  {step_series("loss", info["loss"].get<std::vector<double>>())}, plot);
  ctx.figure("vision_backbone", "figures/vit_pretraining_loss.svg",
             "Training loss of the ViT on Fashion-MNIST");
  return dir;
}

// ---- 2. transfer to digits ----

void transfer(Context& ctx, const std::string& vit, const Dataset& train_d, const Dataset& test_d) {
  const Sizes& s = ctx.sizes;
  struct Method {
    std::string name, key;
  };
  const std::vector<Method> methods = {{"linear probe", "probe"},
                                       {"LoRA r=4 (all projections) + head", "lora"},
                                       {"bottleneck adapter + head", "adapter"},
                                       {"full fine-tuning", "full"}};
  nlohmann::json rows = nlohmann::json::array();
  std::vector<Series> curves;
  std::vector<double> accs, params;
  const at::Tensor truth = labels_of(test_d);
  for (const auto& m : methods) {
    const auto start = std::chrono::steady_clock::now();
    Model model = load_vit(ctx, vit);
    const int64_t total = model->num_parameters();
    ModuleSet set(model);
    std::vector<std::string> trainable;
    // The head is a module too: a full-rank LoRA on the classifier is a linear probe that saves as a module.
    const std::string head = m.key == "probe" ? "digits-probe" : "digits-" + m.key + "-head";
    if (m.key != "full") set.add(head, lora(10, {"classifier"}, ctx.options.seed)), trainable.push_back(head);
    // LoRA on every projection ("dense" covers the attention output and both MLP layers).
    if (m.key == "lora")
      set.add("digits-lora", lora(4, {"query", "key", "value", "dense"}, ctx.options.seed + 1)),
          trainable.push_back("digits-lora");
    if (m.key == "adapter")
      set.add("digits-adapter", adapter(2, ctx.options.seed + 2)), trainable.push_back("digits-adapter");
    const bool full = m.key == "full";
    auto history =
        train(ctx, set, trainable, train_options(ctx, s.transfer_steps, full ? 1e-3 : 1e-2, s.batch, full),
              train_d, "transfer to digits: " + m.name);
    const double seconds = seconds_since(start);
    const double acc = accuracy(predict_logits(*model, test_d), truth);
    const int64_t trainable_params = full ? total : set.summary().trainable;
    rows.push_back(
        {{"method", m.name},
         {"accuracy", acc},
         {"trainable_parameters", trainable_params},
         {"trainable_percent", 100.0 * static_cast<double>(trainable_params) / static_cast<double>(total)},
         {"seconds", seconds}});
    curves.push_back(step_series(m.name, losses(history)));
    accs.push_back(acc);
    params.push_back(static_cast<double>(trainable_params));
    for (const auto& name : trainable) set.save(name, (fs::path(ctx.modules_dir) / "vision" / name).string());
  }
  ctx.results["transfer"] = {{"train_examples", train_d.examples.size()},
                             {"test_examples", test_d.examples.size()},
                             {"steps", s.transfer_steps},
                             {"methods", rows}};
  PlotOptions plot;
  plot.title = "Transfer to MNIST digits: training loss";
  plot.x_label = "step", plot.y_label = "loss";
  write_line_plot((fs::path(ctx.figures_dir) / "transfer_loss.svg").string(), curves, plot);
  ctx.figure("transfer", "figures/transfer_loss.svg", "Training loss of each transfer method on the digits");
  plot.title = "Transfer to MNIST digits: test accuracy";
  plot.y_label = "accuracy";
  std::vector<std::string> names;
  for (const auto& m : methods) names.push_back(m.key);
  write_bar_plot((fs::path(ctx.figures_dir) / "transfer_accuracy.svg").string(), names, {"accuracy"}, {accs},
                 plot);
  ctx.figure("transfer", "figures/transfer_accuracy.svg",
             "Digit accuracy per method (probe, LoRA, adapter, full)");
  const double best_module = std::max(accs[1], accs[2]);
  ctx.check("modules come near full fine-tuning at a small fraction of the parameters",
            best_module >= accs[3] - 0.05 && std::max(params[1], params[2]) < 0.2 * params[3],
            "best module " + pct(best_module) + " with " + pct(std::max(params[1], params[2]) / params[3]) +
                " of the parameters vs full fine-tuning " + pct(accs[3]));
  ctx.results["transfer"]["full_ft_accuracy"] = accs[3];
}

// ---- 3. continual learning, 4. Polytropon ----

struct TaskData {
  std::vector<Dataset> train, test;
};

TaskData fashion_tasks(Context& ctx, const ImageSet& train, const ImageSet& test) {
  TaskData t;
  for (int k = 0; k < kTasks; ++k) {
    const std::string task = "task" + std::to_string(k + 1);
    const std::vector<std::string> names = {kFashion[2 * k], kFashion[2 * k + 1]};
    t.train.push_back(
        dataset(sample(pair(train, 2 * k, 2 * k + 1, true), ctx.sizes.task_train, ctx.options.seed + 10 + k),
                names, task));
    t.test.push_back(dataset(pair(test, 2 * k, 2 * k + 1, true), names, task));
  }
  // Test sets carry every task's name, so that task ids are the same as in the mixed training data.
  for (auto& d : t.test) {
    d.tasks.clear();
    for (const auto& tr : t.train) d.tasks.push_back(tr.tasks.at(0));
  }
  return t;
}

/// accuracy of the binary decision (logits 0 and 1) on each task's test data.
double binary_accuracy(ModelImpl& model, const Dataset& test) {
  return accuracy(predict_logits(model, test), labels_of(test), {0, 1});
}

void continual(Context& ctx, const std::string& vit, const TaskData& tasks) {
  const Sizes& s = ctx.sizes;
  const double nan = std::nan("");
  // acc[k][j]: accuracy on task j after learning tasks 0..k
  std::vector<std::vector<double>> modules(kTasks, std::vector<double>(kTasks, nan)), full = modules;
  std::vector<double> untrained;
  {  // a module per task on the frozen backbone: each task switches its own module on
    Model model = load_vit(ctx, vit);
    ModuleSet set(model);
    for (int k = 0; k < kTasks; ++k) untrained.push_back(binary_accuracy(*model, tasks.test[k]));
    for (int k = 0; k < kTasks; ++k) {
      const std::string name = "fashion-task" + std::to_string(k + 1);
      set.add(name, lora(8, {"query", "value", "classifier"}, ctx.options.seed + 20 + k));
      for (const auto& other : set.names()) set.set_active(other, other == name);
      train(ctx, set, {name}, train_options(ctx, s.task_steps, 5e-3, s.batch), tasks.train[k],
            "continual: module for task " + std::to_string(k + 1));
      for (int j = 0; j <= k; ++j) {
        const std::string own = "fashion-task" + std::to_string(j + 1);
        for (const auto& other : set.names()) set.set_active(other, other == own);
        modules[k][j] = binary_accuracy(*model, tasks.test[j]);
      }
      set.save(name, (fs::path(ctx.modules_dir) / "vision" / name).string());
    }
  }
  {  // sequential full fine-tuning of one model
    Model model = load_vit(ctx, vit);
    ModuleSet set(model);
    for (int k = 0; k < kTasks; ++k) {
      train(ctx, set, {}, train_options(ctx, s.task_steps, 5e-4, s.batch, true), tasks.train[k],
            "continual: full fine-tuning on task " + std::to_string(k + 1));
      for (int j = 0; j <= k; ++j) full[k][j] = binary_accuracy(*model, tasks.test[j]);
    }
  }
  auto summarise = [&](const std::vector<std::vector<double>>& acc) {
    std::vector<double> final_row = acc[kTasks - 1], drops;
    for (int j = 0; j + 1 < kTasks; ++j) drops.push_back(acc[j][j] - acc[kTasks - 1][j]);
    return nlohmann::json{{"accuracy_after_each_task", matrix_json(acc)},
                          {"final", final_row},
                          {"final_mean", mean(final_row)},
                          {"forgetting", mean(drops)}};
  };
  std::vector<std::string> task_names;
  for (int k = 0; k < kTasks; ++k) task_names.push_back(kFashion[2 * k] + "/" + kFashion[2 * k + 1]);
  ctx.results["continual"] = {{"tasks", task_names},
                              {"steps_per_task", s.task_steps},
                              {"backbone_alone", untrained},
                              {"modules", summarise(modules)},
                              {"sequential_full_ft", summarise(full)}};
  std::vector<double> just_learned;
  for (int k = 0; k < kTasks; ++k) just_learned.push_back(full[k][k]);
  PlotOptions plot;
  plot.title = "Continual learning on Fashion-MNIST: accuracy per task";
  plot.y_label = "accuracy";
  std::vector<std::string> short_names;
  for (int k = 0; k < kTasks; ++k) short_names.push_back("task " + std::to_string(k + 1));
  write_bar_plot((fs::path(ctx.figures_dir) / "continual_accuracy.svg").string(), short_names,
                 {"modules, at the end", "full FT, just learned", "full FT, at the end"},
                 {modules[kTasks - 1], just_learned, full[kTasks - 1]}, plot);
  ctx.figure(
      "continual", "figures/continual_accuracy.svg",
      "Each task's accuracy: with its module at the end, and with sequential full fine-tuning right after "
      "learning it and at the end");
  std::vector<Series> first;  // task 1's accuracy as tasks are added
  for (const auto& [name, acc] :
       {std::pair<std::string, const std::vector<std::vector<double>>*>{"modules", &modules},
        {"sequential full FT", &full}}) {
    Series line{name, {}, {}};
    for (int k = 0; k < kTasks; ++k) line.x.push_back(k + 1), line.y.push_back((*acc)[k][0]);
    first.push_back(line);
  }
  plot.title = "Task 1 accuracy as later tasks are learned";
  plot.x_label = "tasks learned";
  write_line_plot((fs::path(ctx.figures_dir) / "continual_task1.svg").string(), first, plot);
  ctx.figure("continual", "figures/continual_task1.svg",
             "Task 1 (T-shirt vs Trouser) accuracy after each new task");
  const double fm = ctx.results["continual"]["modules"]["forgetting"],
               ff = ctx.results["continual"]["sequential_full_ft"]["forgetting"];
  ctx.check("no forgetting with a module per task", std::abs(fm) < 1e-9, "mean accuracy drop " + pct(fm));
  ctx.check("clear forgetting with sequential full fine-tuning", ff > 0.05, "mean accuracy drop " + pct(ff));
}

void polytropon(Context& ctx, const std::string& vit, const TaskData& tasks) {
  const Sizes& s = ctx.sizes;
  const Dataset mixed = concat(tasks.train);
  std::vector<double> poly_acc, shared_acc;
  std::vector<std::vector<double>> allocation;
  {
    Model model = load_vit(ctx, vit);
    ModuleSet set(model);
    ModuleConfig c;
    c.type = "poly_lora";
    c.poly.num_tasks = kTasks;
    c.poly.num_skills = 4;
    c.poly.r = 4;
    c.poly.alpha = 8;
    c.poly.shared_allocation = true;
    c.targets.target_modules = {"query", "value", "classifier"};
    c.seed = ctx.options.seed + 30;
    set.add("fashion-polytropon", c);
    train(ctx, set, {"fashion-polytropon"}, train_options(ctx, s.poly_steps, 5e-3, s.batch), mixed,
          "multi-task: Polytropon over 5 tasks");
    for (int k = 0; k < kTasks; ++k) poly_acc.push_back(binary_accuracy(*model, tasks.test[k]));
    const auto sites = set.sites("fashion-polytropon");
    auto* part = dynamic_cast<PolyLoraImpl*>(set.module_at("fashion-polytropon", sites.front()).get());
    MDL_CHECK(part != nullptr, "[demo] the Polytropon module has no skill allocation");
    torch::NoGradGuard no_grad;
    at::Tensor w = part->allocation()
                       ->weights(at::arange(kTasks, at::kLong).to(ctx.device), false)
                       .mean(1)
                       .cpu();  // (tasks, skills)
    for (int k = 0; k < kTasks; ++k) {
      std::vector<double> row;
      for (int64_t j = 0; j < w.size(1); ++j) row.push_back(w[k][j].item<double>());
      allocation.push_back(row);
    }
    set.save("fashion-polytropon", (fs::path(ctx.modules_dir) / "vision" / "fashion-polytropon").string());
  }
  {  // the same data through one LoRA: the tasks' labels conflict without routing
    Model model = load_vit(ctx, vit);
    ModuleSet set(model);
    set.add("fashion-shared", lora(8, {"query", "value", "classifier"}, ctx.options.seed + 31));
    train(ctx, set, {"fashion-shared"}, train_options(ctx, s.poly_steps, 5e-3, s.batch), mixed,
          "multi-task: one shared LoRA");
    for (int k = 0; k < kTasks; ++k) shared_acc.push_back(binary_accuracy(*model, tasks.test[k]));
  }
  // Do the skills specialise by task? Each task's allocation is its mean routing over the skills.
  std::vector<double> flat;
  for (const auto& row : allocation) flat.insert(flat.end(), row.begin(), row.end());
  const at::Tensor per_task = at::tensor(flat, at::kDouble).view({kTasks, -1});
  ctx.results["polytropon"] = {{"skills", 4},
                               {"specialisation_by_task", specialisation(per_task, ctx.options.seed)},
                               {"specialisation_random", random_routing(kTasks, per_task.size(1))},
                               {"accuracy", poly_acc},
                               {"mean_accuracy", mean(poly_acc)},
                               {"shared_lora_accuracy", shared_acc},
                               {"shared_lora_mean_accuracy", mean(shared_acc)},
                               {"allocation", matrix_json(allocation)},
                               {"steps", s.poly_steps}};
  PlotOptions plot;
  plot.title = "Polytropon: learned task-by-skill allocation";
  plot.x_label = "skill", plot.y_label = "task";
  std::vector<std::string> rows, cols;
  for (int k = 0; k < kTasks; ++k) rows.push_back("task " + std::to_string(k + 1));
  for (int j = 0; j < 4; ++j) cols.push_back("skill " + std::to_string(j + 1));
  write_heatmap((fs::path(ctx.figures_dir) / "polytropon_allocation.svg").string(), rows, cols, allocation,
                plot);
  ctx.figure("polytropon", "figures/polytropon_allocation.svg",
             "Polytropon's learned allocation (rows sum to one)");
  ctx.check("task routing (Polytropon) beats one shared module on conflicting tasks",
            mean(poly_acc) > mean(shared_acc),
            "Polytropon " + pct(mean(poly_acc)) + " vs shared LoRA " + pct(mean(shared_acc)));
}

// ---- 5. mixture of experts ----

void mixture_of_experts(Context& ctx, const std::string& vit, const Dataset& train_d, const Dataset& test_d) {
  const Sizes& s = ctx.sizes;
  Model dense = load_vit(ctx, vit);
  UpcycleOptions up;
  up.experts = 4;
  up.top_k = 2;
  up.seed = ctx.options.seed + 40;
  up.router_json = R"({"kind": "top_k", "k": 2, "load_balancing_coef": 0.01})";
  Model moe = upcycle(*dense, up);
  dense.reset();
  const double before = accuracy(predict_logits(*moe, test_d), labels_of(test_d));
  ModuleSet set(moe);
  const auto start = std::chrono::steady_clock::now();
  auto history = train(ctx, set, {}, train_options(ctx, s.transfer_steps, 1e-3, s.batch, true), train_d,
                       "mixture of experts: upcycled ViT on digits");
  const double seconds = seconds_since(start);
  const double acc = accuracy(predict_logits(*moe, test_d), labels_of(test_d));
  // Expert load per layer on the test digits.
  std::vector<std::vector<double>> load;
  std::vector<double> max_load;
  nlohmann::json by_digit = nlohmann::json::array();
  {
    torch::NoGradGuard no_grad;
    const int64_t n = std::min<int64_t>(512, static_cast<int64_t>(test_d.examples.size()));
    ModelInput in;
    in.pixel_values = test_d.images.narrow(0, 0, n).to(ctx.device);
    RoutingLog log;
    log.keep_weights(true);
    in.routing_log = &log;
    moe->eval();
    moe->forward(in);
    // Do the experts specialise by digit? Every token of an image carries the image's class.
    const at::Tensor classes = labels_of(test_d).narrow(0, 0, n);
    for (const auto& st : log.stats()) {
      load.push_back(st.load);
      max_load.push_back(*std::max_element(st.load.begin(), st.load.end()));
      const at::Tensor rules = classes.repeat_interleave(st.weights.size(0) / n);
      by_digit.push_back(specialisation(st.weights, rules, 10, ctx.options.seed));
      by_digit.back()["site"] = st.site;
    }
  }
  save_model(*moe, (fs::path(ctx.models_dir) / "vit-moe-digits").string());
  ctx.results["moe"] = {{"experts", 4},
                        {"top_k", 2},
                        {"accuracy_before_training", before},
                        {"accuracy", acc},
                        {"dense_accuracy", ctx.results["transfer"]["full_ft_accuracy"]},
                        {"seconds", seconds},
                        {"expert_load", matrix_json(load)},
                        {"specialisation_by_digit", by_digit},
                        {"specialisation_random", random_routing(10, 4)},
                        {"max_load", max_load},
                        {"parameters", moe->num_parameters()}};
  PlotOptions plot;
  plot.title = "Upcycled ViT: share of tokens per expert";
  plot.x_label = "expert", plot.y_label = "layer";
  std::vector<std::string> rows, cols;
  for (size_t l = 0; l < load.size(); ++l) rows.push_back("layer " + std::to_string(l));
  for (int e = 0; e < 4; ++e) cols.push_back("expert " + std::to_string(e));
  write_heatmap((fs::path(ctx.figures_dir) / "moe_expert_load.svg").string(), rows, cols, load, plot);
  ctx.figure("moe", "figures/moe_expert_load.svg",
             "Expert load per layer after fine-tuning (uniform = 0.25)");
  plot = PlotOptions();
  plot.title = "Upcycled ViT fine-tuned on digits: training loss (incl. load-balancing loss)";
  plot.x_label = "step", plot.y_label = "loss";
  write_line_plot((fs::path(ctx.figures_dir) / "moe_loss.svg").string(),
                  {step_series("upcycled top-2-of-4", losses(history))}, plot);
  ctx.figure("moe", "figures/moe_loss.svg", "Training loss of the upcycled model");
}

// ---- 6. merging ----

void merging(Context& ctx, const std::string& vit, const ImageSet& train_set, const ImageSet& test) {
  const Sizes& s = ctx.sizes;
  Model model = load_vit(ctx, vit);
  ModuleSet set(model);
  // Every pair module refines the features under one shared head: the digits linear probe of experiment 2
  // (task vectors on a shared head, as merging assumes).
  const std::string probe = set.load((fs::path(ctx.modules_dir) / "vision" / "digits-probe").string());
  auto use = [&](const std::string& name) {
    for (const auto& other : set.names()) set.set_active(other, other == name || other == probe);
  };
  const Dataset all = dataset(test, kDigits);
  std::vector<double> probe_only;
  std::vector<Dataset> tests;
  std::vector<std::string> dirs;
  std::vector<double> own;
  std::vector<std::vector<int64_t>> classes;
  for (int k = 0; k < kTasks; ++k) {
    const std::string name = "digits-pair" + std::to_string(k + 1);
    classes.push_back({2 * k, 2 * k + 1});
    const Dataset tr = dataset(
        sample(pair(train_set, 2 * k, 2 * k + 1, false), s.task_train, ctx.options.seed + 50 + k), kDigits);
    tests.push_back(dataset(pair(test, 2 * k, 2 * k + 1, false), kDigits));
    use("");
    probe_only.push_back(accuracy(predict_logits(*model, tests[k]), labels_of(tests[k]), classes[k]));
    set.add(name, lora(8, {"query", "value"}, ctx.options.seed + 60 + k));
    use(name);
    train(ctx, set, {name}, train_options(ctx, s.task_steps, 5e-3, s.batch), tr,
          "merging: digit pair module " + std::to_string(k + 1));
    own.push_back(accuracy(predict_logits(*model, tests[k]), labels_of(tests[k]), classes[k]));
    dirs.push_back((fs::path(ctx.modules_dir) / "vision" / name).string());
    set.save(name, dirs.back());
  }
  use("");
  nlohmann::json methods = nlohmann::json::array();
  methods.push_back({{"method", "shared head only"},
                     {"task_accuracy", probe_only},
                     {"mean_task_accuracy", mean(probe_only)},
                     {"ten_way_accuracy", accuracy(predict_logits(*model, all), labels_of(all))}});
  methods.push_back({{"method", "own module"}, {"task_accuracy", own}, {"mean_task_accuracy", mean(own)}});
  std::vector<std::vector<double>> bars = {probe_only, own};
  std::vector<std::string> series = {"shared head only", "own module"};
  struct M {
    std::string label, method;
    double lambda, density;
  };
  // Task arithmetic sums the task vectors: scaled by 0.4, the usual choice for several tasks (Ilharco et
  // al.).
  for (const M& m : {M{"linear (average)", "linear", 1.0, 1.0},
                     M{"task arithmetic (0.4)", "task_arithmetic", 0.4, 1.0}, M{"TIES", "ties", 1.0, 0.5}}) {
    MergeOptions o;
    o.method = m.method;
    o.lambda = m.lambda;
    o.density = m.density;
    o.rank = 8 * kTasks;  // room for every input's rank: the merge is not truncated by the factorisation
    o.seed = ctx.options.seed;
    const std::string out = (fs::path(ctx.modules_dir) / "vision" / ("digits-merged-" + m.method)).string();
    merge_modules(vit, dirs, o, out);
    const std::string name = set.load(out);
    use(name);
    std::vector<double> acc;
    for (int k = 0; k < kTasks; ++k)
      acc.push_back(accuracy(predict_logits(*model, tests[k]), labels_of(tests[k]), classes[k]));
    const double ten_way = accuracy(predict_logits(*model, all), labels_of(all));
    methods.push_back({{"method", m.label},
                       {"task_accuracy", acc},
                       {"mean_task_accuracy", mean(acc)},
                       {"ten_way_accuracy", ten_way}});
    bars.push_back(acc);
    series.push_back(m.label);
    set.remove(name);
  }
  ctx.results["merging"] = {
      {"tasks", {"0/1", "2/3", "4/5", "6/7", "8/9"}}, {"methods", methods}, {"steps_per_task", s.task_steps}};
  PlotOptions plot;
  plot.title = "Merging five digit-pair LoRAs: accuracy per task";
  plot.y_label = "accuracy";
  write_bar_plot((fs::path(ctx.figures_dir) / "merging_accuracy.svg").string(),
                 {"0/1", "2/3", "4/5", "6/7", "8/9"}, series, bars, plot);
  ctx.figure("merging", "figures/merging_accuracy.svg",
             "Each digit pair's accuracy with its own module and with merges");
  double best = 0;
  std::string best_name;
  for (size_t i = 2; i < methods.size(); ++i)
    if (methods[i]["mean_task_accuracy"].get<double>() > best)
      best = methods[i]["mean_task_accuracy"], best_name = methods[i]["method"];
  ctx.check("a merged module keeps most of what the task modules add over the shared head",
            best - mean(probe_only) >= 0.5 * (mean(own) - mean(probe_only)),
            best_name + " " + pct(best) + " vs own modules " + pct(mean(own)) +
                " and the shared head alone " + pct(mean(probe_only)));
}

}  // namespace

std::string vit_cache_path(const Context& ctx) {
  const Sizes& s = ctx.sizes;
  std::string key = model_config_to_json(vit_config(s)) + "|fashion-mnist|" +
                    std::to_string(s.pretrain_examples) + "|" + std::to_string(s.pretrain_steps) + "|" +
                    std::to_string(s.batch) + "|" + std::to_string(ctx.options.seed) + "|" +
                    ctx.options.device;
  return (fs::path(ctx.cache_dir) / ("vit-" + hex64(fnv1a(key)))).string();
}

int64_t planned_vision_steps(const Sizes& s, bool cached) {
  return (cached ? 0 : s.pretrain_steps) + 5 * s.transfer_steps + 3 * kTasks * s.task_steps +
         2 * s.poly_steps;
}

void run_vision(Context& ctx) {
  const Sizes& s = ctx.sizes;
  const ImageSet fashion_train = read_fashion_mnist(ctx.options.fashion_mnist_dir, true);
  const ImageSet fashion_test =
      sample(read_fashion_mnist(ctx.options.fashion_mnist_dir, false), s.test_examples, ctx.options.seed + 2);
  const std::string vit = pretrain_vit(ctx, fashion_train, fashion_test);
  // Digits: a seeded split of the npm package's 10,000 images.
  const ImageSet digits = sample(read_mnist_digits(ctx.options.mnist_dir), 1 << 30, ctx.options.seed + 3);
  const int64_t n_test = std::min<int64_t>(s.test_examples, digits.size() / 5);
  const ImageSet digits_test = digits.select(at::arange(n_test, at::kLong));
  const ImageSet digits_train =
      digits.select(at::arange(n_test, std::min(digits.size(), n_test + s.transfer_train), at::kLong));
  const Dataset train_d = dataset(digits_train, kDigits), test_d = dataset(digits_test, kDigits);
  transfer(ctx, vit, train_d, test_d);
  const TaskData tasks = fashion_tasks(ctx, fashion_train, fashion_test);
  continual(ctx, vit, tasks);
  polytropon(ctx, vit, tasks);
  mixture_of_experts(ctx, vit, train_d, test_d);
  merging(ctx, vit, digits_train, digits_test);
}

}  // namespace mdl::demo
