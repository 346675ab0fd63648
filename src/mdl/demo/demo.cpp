#include "mdl/demo/demo.h"

#include <ATen/ATen.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <thread>

#include "mdl/core/device.h"
#include "mdl/core/error.h"
#include "mdl/core/threads.h"
#include "mdl/demo/demo_context.h"
#include "mdl/io/atomic_file.h"
#include "mdl/modules/module_set.h"
#include "mdl/routing/routing_context.h"

namespace fs = std::filesystem;

namespace mdl::demo {

const std::vector<std::pair<std::string, std::string>>& fortune_packages() {
  static const std::vector<std::pair<std::string, std::string>> packages = {
      {"en", "fortunes"},    {"de", "fortunes-de"}, {"es", "fortunes-es"}, {"it", "fortunes-it"},
      {"ru", "fortunes-ru"}, {"pl", "fortunes-pl"}, {"cs", "fortunes-cs"}, {"pt", "fortunes-br"}};
  return packages;
}

const char* size_name(DemoSize size) {
  return size == DemoSize::tiny ? "tiny" : size == DemoSize::full ? "full" : "standard";
}

Sizes sizes_for(DemoSize size) {
  Sizes s;
  if (size == DemoSize::tiny) {
    s.vit_hidden = 16, s.vit_layers = 2, s.vit_heads = 2, s.vit_intermediate = 32, s.vit_patch = 14;
    s.pretrain_examples = 256, s.pretrain_steps = 6, s.batch = 16, s.test_examples = 64;
    s.transfer_train = 128, s.transfer_steps = 4, s.task_train = 64, s.task_steps = 3, s.poly_steps = 4;
    s.lm_hidden = 16, s.lm_layers = 1, s.lm_heads = 2, s.lm_intermediate = 32, s.vocab = 300, s.seq_len = 16;
    s.lm_texts_per_language = 40, s.lm_pretrain_steps = 4, s.lm_batch = 8;
    s.language_adapter_steps = 4, s.text_task_train = 32, s.text_task_steps = 3, s.text_task_test = 16;
    s.mf_hidden = 16, s.mf_att_hidden = 8, s.mf_ffd_hidden = 16, s.mf_experts = 4, s.mf_seq_len = 16;
    s.mf_batch = 4, s.mf_train_chunks = 32, s.mf_valid_chunks = 8;
    s.mf_steps = 3, s.mf_continual_steps = 2, s.mf_prune_steps = 2, s.mf_added_experts = 2,
    s.mf_keep_experts = 2;
    s.md_rules = {2, 4}, s.md_seeds = 1, s.md_steps = 3, s.md_batch = 16, s.md_eval_batches = 1;
    s.md_sequence_tasks = {"mha", "rnn"}, s.md_sequence_rules = {2};
    s.tr_hidden = 16, s.tr_layers = 2, s.tr_heads = 2, s.tr_intermediate = 32, s.tr_patch = 14;
    s.tr_student_layers = 1, s.tr_narrow_hidden = 8, s.tr_narrow_intermediate = 16;
    s.tr_pretrain_examples = 128, s.tr_pretrain_steps = 3, s.tr_task_train = 64, s.tr_module_steps = 3;
    s.tr_distill_steps = 2, s.tr_seeds = 1, s.tr_align_examples = 32, s.tr_eval_steps = {0, 1, 2};
    s.tr_batch = 16, s.tr_test_examples = 64;
    s.tt_teacher_adapter_steps = 2, s.tt_distill_steps = 2, s.tt_adapter_steps = 2;
    s.s2_cells = 16, s.s2_modules = 4, s.s2_hidden = 8, s.s2_steps = 10, s.s2_batch = 4,
    s.s2_episode_steps = 4;
    s.s2_test_episodes = 4;
  } else if (size == DemoSize::full) {  // 18 minutes on 2 cores (measured)
    s.vit_hidden = 96, s.vit_layers = 5, s.vit_heads = 4, s.vit_intermediate = 192, s.vit_patch = 7;
    s.pretrain_steps = 3000, s.test_examples = 10000;
    s.transfer_steps = 2000, s.task_train = 6000, s.task_steps = 250, s.poly_steps = 800;
    s.lm_hidden = 160, s.lm_layers = 4, s.lm_heads = 4, s.lm_intermediate = 384, s.vocab = 1536,
    s.seq_len = 48;
    s.lm_texts_per_language = 6000, s.lm_pretrain_steps = 1500;
    s.language_adapter_steps = 1200, s.text_task_train = 4000, s.text_task_steps = 600,
    s.text_task_test = 1000;
    s.mf_steps = 800, s.mf_continual_steps = 500, s.mf_prune_steps = 300, s.mf_train_chunks = 12000;
    s.md_rules = {2, 4, 8, 16}, s.md_seeds = 2, s.md_steps = 3000;  // the paper trains 100k (500k) steps
    s.md_sequence_tasks = {"mha", "rnn"};
    s.s2_steps = 1500, s.s2_test_episodes = 512;
  }
  return s;
}

// ---- progress ----

Progress::Progress(int64_t total_steps, bool enabled, std::string report, std::string peer)
    : total_(std::max<int64_t>(1, total_steps)),
      report_(std::move(report)),
      peer_(std::move(peer)),
      enabled_(enabled),
      tty_(isatty(STDERR_FILENO) != 0),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_) {}

void Progress::stage(const std::string& name, int64_t steps) {
  stage_ = name, stage_steps_ = steps, stage_done_ = 0;
  if (enabled_ && !tty_)
    std::fprintf(stderr, "[demo] %3d%% %s (%lld steps)\n", static_cast<int>(100 * done_ / total_),
                 name.c_str(), static_cast<long long>(steps));
  draw(true);
}

void Progress::step() {
  ++done_, ++stage_done_;
  draw(false);
}

void Progress::wait(const std::function<bool()>& done) {
  while (!done()) {
    draw(true);
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
}

void Progress::draw(bool force) {
  const auto now = std::chrono::steady_clock::now();
  if (!force && now - last_draw_ < std::chrono::milliseconds(200)) return;
  last_draw_ = now;
  if (!report_.empty()) {  // for the other process's bar
    std::ofstream out(report_ + ".tmp", std::ios::trunc);
    out << done_ << " " << total_ << " " << stage_ << " " << stage_done_ << "/" << stage_steps_ << "\n";
    out.close();
    std::error_code ec;
    fs::rename(report_ + ".tmp", report_, ec);
  }
  if (!enabled_ || !tty_) return;
  int64_t done = done_, total = total_;
  std::string text = stage_ + " " + std::to_string(stage_done_) + "/" + std::to_string(stage_steps_);
  if (!peer_.empty()) {  // "done total stage...", written by the language process
    std::ifstream in(peer_);
    int64_t peer_done = 0, peer_total = 0;
    std::string peer_stage;
    if (in >> peer_done >> peer_total && std::getline(in, peer_stage)) {
      done += peer_done, total += peer_total;
      text += " |" + peer_stage;
    }
  }
  const double frac =
      std::min(1.0, static_cast<double>(done) / static_cast<double>(std::max<int64_t>(1, total)));
  const int width = 30, filled = static_cast<int>(frac * width);
  std::string bar(static_cast<size_t>(filled), '#');
  bar.resize(width, '.');
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  std::fprintf(stderr, "\r\033[K[%s] %3d%% %5.0fs  %.120s", bar.c_str(), static_cast<int>(frac * 100),
               elapsed, text.c_str());
  std::fflush(stderr);
}

void Progress::finish() {
  if (enabled_ && tty_) std::fprintf(stderr, "\r\033[K");
  if (enabled_) std::fprintf(stderr, "[demo] done in %.0f s\n", seconds_since(start_));
}

// ---- context and helpers ----

void Context::figure(const std::string& section, const std::string& file, const std::string& caption) {
  results["figures"].push_back({{"section", section}, {"file", file}, {"caption", caption}});
}

void Context::check(const std::string& claim, bool holds, const std::string& detail) {
  checks.push_back({claim, holds, detail});
}

ModelConfig fashion_vit_config(int64_t hidden, int64_t layers, int64_t heads, int64_t intermediate,
                               int64_t patch) {
  ModelConfig c;
  c.arch = Arch::vit;
  c.model_type = "vit";
  c.architecture = "ViTForImageClassification";
  c.head = HeadKind::sequence_classification;
  c.hidden_size = hidden;
  c.n_layer = layers;
  c.n_head = c.n_kv_head = heads;
  c.head_dim = hidden / heads;
  c.intermediate_size = intermediate;
  c.image_size = 28;
  c.patch_size = patch;
  c.num_channels = 1;
  c.max_position = c.num_patches() + 1;
  c.norm_eps = 1e-12;
  c.activation = "gelu";
  c.qkv_bias = c.o_bias = c.mlp_bias = true;
  c.num_labels = 10;
  return parse_model_config(model_config_to_json(c), "demo ViT config");
}

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

TrainOptions train_options(const Context& ctx, int64_t steps, double lr, int64_t batch, bool train_base) {
  TrainOptions o;
  o.steps = steps;
  o.batch_size = batch;
  o.schedule.kind = "cosine";
  o.schedule.lr = lr;
  o.schedule.warmup_steps = std::max<int64_t>(1, steps / 20);
  o.schedule.total_steps = steps;
  o.schedule.min_lr_ratio = 0.05;
  o.weight_decay = train_base ? 0.05 : 0.0;
  o.clip_grad_norm = 1.0;
  o.seed = ctx.options.seed;
  o.train_base = train_base;
  return o;
}

std::vector<TrainMetrics> train(Context& ctx, ModuleSet& set, const std::vector<std::string>& trainable,
                                const TrainOptions& options, const Dataset& data, const std::string& stage) {
  ctx.progress->stage(stage, options.steps);
  Trainer trainer(set, trainable, options);
  auto history = trainer.train(data, nullptr, [&](const TrainMetrics&) { ctx.progress->step(); });
  set.model()->eval();
  return history;
}

std::vector<std::string> fortunes_of(const Context& ctx, const std::string& language) {
  std::string package;
  for (const auto& [l, p] : fortune_packages())
    if (l == language) package = p;
  MDL_CHECK(!package.empty(), "[demo] no fortunes package for language '", language, "'");
  auto it = ctx.options.fortune_files.find(language);
  const auto files = it != ctx.options.fortune_files.end()
                         ? it->second
                         : package_files(package, ctx.options.fortunes_root, ctx.options.dpkg_info);
  auto entries = read_fortunes(files);
  MDL_CHECK(entries.size() >= 8, "[demo] only ", entries.size(), " fortunes for language '", language,
            "' (package ", package, "); expected hundreds");
  return entries;
}

std::string number(double v, const char* format) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), format, v);
  return buf;
}

at::Tensor labels_of(const Dataset& data) {
  std::vector<int64_t> labels;
  for (const auto& e : data.examples) labels.push_back(e.label);
  return at::tensor(labels, at::kLong);
}

double accuracy(const at::Tensor& logits, const at::Tensor& labels, const std::vector<int64_t>& classes) {
  if (labels.numel() == 0) return std::nan("");
  at::Tensor predicted;
  if (classes.empty()) {
    predicted = logits.argmax(1);
  } else {
    at::Tensor cols = at::tensor(classes, at::kLong);
    predicted = cols.index_select(0, logits.index_select(1, cols).argmax(1));
  }
  return (predicted == labels).to(at::kDouble).mean().item<double>();
}

std::vector<double> losses(const std::vector<TrainMetrics>& history) {
  std::vector<double> out;
  for (const auto& m : history) out.push_back(m.loss);
  return out;
}

Series step_series(const std::string& name, const std::vector<double>& y) {
  Series s{name, {}, y};
  for (size_t i = 0; i < y.size(); ++i) s.x.push_back(static_cast<double>(i + 1));
  return s;
}

void write_dir_atomic(const std::string& dir, const std::function<void(const std::string& tmp)>& make) {
  const std::string tmp = dir + ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  make(tmp);
  const std::string old = dir + ".old-" + std::to_string(::getpid());
  if (fs::exists(dir)) fs::rename(dir, old);
  fs::rename(tmp, dir);
  fs::remove_all(old);
}

std::string hex64(uint64_t h) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
  return buf;
}

bool cache_complete(const std::string& dir) {
  return fs::exists(fs::path(dir) / "pretrain.json");
}

namespace {

std::string default_cache_dir() {
  if (const char* xdg = std::getenv("XDG_CACHE_HOME"); xdg && *xdg)
    return (fs::path(xdg) / "mdl" / "demo").string();
  if (const char* home = std::getenv("HOME"); home && *home)
    return (fs::path(home) / ".cache" / "mdl" / "demo").string();
  return (fs::temp_directory_path() / "mdl-demo-cache").string();
}

void print_summary(const DemoOptions& options, const nlohmann::json& r) {
  auto pct = [](const nlohmann::json& v) {
    char buf[32];
    if (!v.is_number()) return std::string("  -  ");
    std::snprintf(buf, sizeof(buf), "%5.1f%%", 100.0 * v.get<double>());
    return std::string(buf);
  };
  std::printf("\nmdl demo (%s run) — figures in %s/report.md\n\n",
              r["run"]["size"].get<std::string>().c_str(), options.out_dir.c_str());
  if (r.contains("vision_backbone"))
    std::printf("ViT on Fashion-MNIST: test accuracy %s, %lld parameters%s\n",
                pct(r["vision_backbone"]["test_accuracy"]).c_str(),
                static_cast<long long>(r["vision_backbone"]["parameters"].get<int64_t>()),
                r["vision_backbone"]["cached"].get<bool>() ? " (cached)" : "");
  if (r.contains("transfer")) {
    std::printf("\nTransfer to digits          accuracy   trainable params\n");
    for (const auto& m : r["transfer"]["methods"])
      std::printf("  %-24s %s   %9lld (%.2f%%)\n", m["method"].get<std::string>().c_str(),
                  pct(m["accuracy"]).c_str(),
                  static_cast<long long>(m["trainable_parameters"].get<int64_t>()),
                  m["trainable_percent"].get<double>());
  }
  if (r.contains("continual"))
    std::printf(
        "\nContinual (5 tasks)  final mean accuracy: modules %s, sequential full FT %s; forgetting: modules "
        "%s, "
        "full FT %s\n",
        pct(r["continual"]["modules"]["final_mean"]).c_str(),
        pct(r["continual"]["sequential_full_ft"]["final_mean"]).c_str(),
        pct(r["continual"]["modules"]["forgetting"]).c_str(),
        pct(r["continual"]["sequential_full_ft"]["forgetting"]).c_str());
  if (r.contains("polytropon"))
    std::printf("Multi-task routing   mean accuracy: Polytropon %s, one shared LoRA %s\n",
                pct(r["polytropon"]["mean_accuracy"]).c_str(),
                pct(r["polytropon"]["shared_lora_mean_accuracy"]).c_str());
  if (r.contains("moe"))
    std::printf("Mixture of experts   digits accuracy: upcycled top-2-of-4 %s vs dense %s\n",
                pct(r["moe"]["accuracy"]).c_str(), pct(r["moe"]["dense_accuracy"]).c_str());
  if (r.contains("merging")) {
    std::printf("Merging (5 digit-pair modules)   mean task accuracy:");
    for (const auto& m : r["merging"]["methods"])
      std::printf("  %s %s", m["method"].get<std::string>().c_str(), pct(m["mean_task_accuracy"]).c_str());
    std::printf("\n");
  }
  if (r.contains("crosslingual")) {
    std::printf("\nCross-lingual word order (zero-shot)   decoder  task: none  on English  MAD-X\n");
    for (const auto& l : r["crosslingual"]["languages"])
      std::printf("  %-36s %s    %s       %s       %s\n", l["language"].get<std::string>().c_str(),
                  pct(l["backbone_alone"]).c_str(), pct(l["no_language_adapter"]).c_str(),
                  pct(l["english_adapter"]).c_str(), pct(l["madx"]).c_str());
  }
  std::printf("\nExpected directions:\n");
  for (const auto& c : r["checks"])
    std::printf("  [%s] %s (%s)\n", c["holds"].get<bool>() ? "holds" : "DOES NOT HOLD",
                c["claim"].get<std::string>().c_str(), c["detail"].get<std::string>().c_str());
  if (r.contains("serve_command"))
    std::printf("\nServe the trained modules:\n  %s\n", r["serve_command"].get<std::string>().c_str());
}

}  // namespace

nlohmann::json run_demo(const DemoOptions& options) {
  Context ctx;
  ctx.options = options;
  ctx.sizes = sizes_for(options.size);
  ctx.device = parse_device(options.device);
  ctx.cache_dir = options.cache_dir.empty() ? default_cache_dir() : options.cache_dir;
  ctx.figures_dir = (fs::path(options.out_dir) / "figures").string();
  ctx.modules_dir = (fs::path(options.out_dir) / "modules").string();
  ctx.models_dir = (fs::path(options.out_dir) / "models").string();
  for (const auto& d : {ctx.cache_dir, ctx.figures_dir, ctx.modules_dir, ctx.models_dir})
    fs::create_directories(d);
  const auto start = std::chrono::steady_clock::now();
  const bool vit_cached = !options.no_cache && cache_complete(vit_cache_path(ctx));
  // A part or a comma-separated list of them.
  std::set<std::string> parts;
  for (size_t at = 0; at <= options.part.size();) {
    const size_t comma = std::min(options.part.find(',', at), options.part.size());
    const std::string p = options.part.substr(at, comma - at);
    MDL_CHECK(p == "all" || p == "vision" || p == "language" || p == "moduleformer" || p == "modularity" ||
                  p == "transfer" || p == "transfer-vision" || p == "transfer-text" || p == "s2rm",
              "[demo] part '", p,
              "' is unknown; expected all, vision, language, moduleformer, modularity, s2rm or transfer (its "
              "halves: "
              "transfer-vision, transfer-text), or a list: language,moduleformer");
    parts.insert(p);
    at = comma + 1;
  }
  auto runs = [&](const char* p) { return parts.count("all") > 0 || parts.count(p) > 0; };
  const bool vision = runs("vision"), language = runs("language"), moduleformer = runs("moduleformer"),
             modularity = runs("modularity"), s2rm = runs("s2rm"),
             transfer_vision = runs("transfer") || parts.count("transfer-vision"),
             transfer_text = runs("transfer") || parts.count("transfer-text");
  Progress progress((vision ? planned_vision_steps(ctx.sizes, vit_cached) : 0) +
                        (language ? planned_language_steps(ctx.sizes) : 0) +
                        (moduleformer ? planned_moduleformer_steps(ctx.sizes) : 0) +
                        (modularity ? planned_modularity_steps(ctx.sizes) : 0) +
                        (s2rm ? planned_s2rm_steps(ctx.sizes) : 0) +
                        planned_transfer_steps(ctx.sizes, transfer_vision, transfer_text),
                    options.progress, options.progress_file, options.peer_progress_file);
  ctx.progress = &progress;
  ctx.results["run"] = {
      {"size", size_name(options.size)}, {"part", options.part},       {"seed", options.seed},
      {"device", options.device},        {"cores", available_cores()}, {"processes", 1}};
  ctx.results["figures"] = nlohmann::json::array();
  if (vision) run_vision(ctx);
  if (language) run_language(ctx);
  if (transfer_vision || transfer_text) run_transfer(ctx, transfer_vision, transfer_text);
  if (moduleformer) run_moduleformer(ctx);
  if (modularity) run_modularity(ctx);
  if (s2rm) run_s2rm(ctx);
  if (options.wait_for_peer) progress.wait(options.wait_for_peer);
  progress.finish();
  ctx.results["run"]["seconds"] = seconds_since(start);
  nlohmann::json checks = nlohmann::json::array();
  for (const auto& c : ctx.checks)
    checks.push_back({{"claim", c.claim}, {"holds", c.holds}, {"detail", c.detail}});
  ctx.results["checks"] = checks;
  if (options.write_outputs) write_outputs(options, ctx.results);
  return ctx.results;
}

nlohmann::json merge_results(const nlohmann::json& a, const nlohmann::json& b) {
  nlohmann::json out = a;
  for (const auto& [key, value] : b.items()) {
    if ((key == "figures" || key == "checks") && out.contains(key)) {
      for (const auto& v : value) out[key].push_back(v);
    } else if (key != "run" && out.contains(key) && out[key].is_object() && value.is_object()) {
      for (const auto& [k, v] : value.items())  // an experiment split over both processes
        if (!out[key].contains(k)) out[key][k] = v;
    } else if (!out.contains(key)) {
      out[key] = value;
    }
  }
  return out;
}

void write_outputs(const DemoOptions& options, const nlohmann::json& results) {
  io::write_text_atomic((fs::path(options.out_dir) / "results.json").string(), results.dump(2) + "\n");
  write_report(options, results);
  print_summary(options, results);
}

}  // namespace mdl::demo
