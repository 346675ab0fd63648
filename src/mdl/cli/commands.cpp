#include "mdl/cli/commands.h"

#include <ATen/ATen.h>
#include <torch/utils.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>

#include "mdl/backbones/generate.h"
#include "mdl/backbones/init_model.h"
#include "mdl/backbones/model.h"
#include "mdl/core/device.h"
#include "mdl/core/error.h"
#include "mdl/core/log.h"
#include "mdl/core/threads.h"
#include "mdl/io/checkpoint.h"
#include "mdl/io/safetensors.h"
#include "mdl/tokenizers/tokenizer.h"

namespace fs = std::filesystem;

namespace mdl::cli {
namespace {

void apply(const GlobalOptions& g) {
  set_log_level(parse_log_level(g.log_level));
  ThreadConfig t = configure_threads(g.threads);
  log_debug("[threads] budget " + std::to_string(t.budget) + ": torch " + std::to_string(t.torch_threads) +
            ", OpenBLAS " + std::to_string(t.blas_threads));
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
  if (n >= 1000000) std::snprintf(buf, sizeof(buf), "%.2fM", n / 1e6);
  else if (n >= 1000) std::snprintf(buf, sizeof(buf), "%.1fK", n / 1e3);
  else std::snprintf(buf, sizeof(buf), "%lld", static_cast<long long>(n));
  return buf;
}

// ---- init-model -------------------------------------------------------------------------------------
void register_init_model(CLI::App& app, GlobalOptions& g) {
  auto opts = std::make_shared<InitModelOptions>();
  auto out = std::make_shared<std::string>();
  auto shard_mb = std::make_shared<double>(0);
  CLI::App* cmd = app.add_subcommand("init-model", "create a randomly initialised checkpoint in the Hugging Face layout");
  cmd->add_option("--arch", opts->arch, "gpt2 | llama | mistral | qwen2 | bert")
      ->check(CLI::IsMember({"gpt2", "llama", "mistral", "qwen2", "bert"}))
      ->capture_default_str();
  cmd->add_option("--preset", opts->preset, "tiny | small")->check(CLI::IsMember({"tiny", "small"}))->capture_default_str();
  cmd->add_option("--out", *out, "output directory")->required();
  cmd->add_option("--seed", opts->seed, "initialisation seed")->capture_default_str();
  cmd->add_option("--head", opts->head, "causal_lm | sequence_classification | token_classification | none");
  cmd->add_option("--num-labels", opts->num_labels, "labels of a classification head")->capture_default_str();
  cmd->add_option("--corpus", opts->corpus_files, "text file(s) to train the tokenizer on (default: built-in sample)");
  cmd->add_option("--vocab-size", opts->vocab_size, "tokenizer vocabulary target (default: preset's)");
  cmd->add_option("--shard-mb", *shard_mb, "write safetensors shards of at most this many MB (0: one file)");
  cmd->callback([opts, out, shard_mb, &g] {
    apply(g);
    opts->max_shard_bytes = static_cast<int64_t>(*shard_mb * 1024 * 1024);
    auto t0 = std::chrono::steady_clock::now();
    InitModelResult r = init_model(*opts, *out);
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("created %s (%s, %s preset) in %s: %s parameters, vocabulary %lld (tokenizer %lld), %.2f s\n",
                r.config.architecture.c_str(), r.config.model_type.c_str(), opts->preset.c_str(), out->c_str(),
                human(r.parameters).c_str(), static_cast<long long>(r.config.vocab_size),
                static_cast<long long>(r.tokenizer_vocab), s);
  });
}

// ---- inspect ----------------------------------------------------------------------------------------
void register_inspect(CLI::App& app, GlobalOptions& g) {
  auto path = std::make_shared<std::string>();
  auto limit = std::make_shared<int>(0);
  CLI::App* cmd = app.add_subcommand("inspect", "list the tensors, dtypes, shapes and parameter counts of a file or checkpoint");
  cmd->add_option("path", *path, "a .safetensors file or a checkpoint directory")->required();
  cmd->add_option("--limit", *limit, "print at most this many tensors (0: all)");
  cmd->callback([path, limit, &g] {
    apply(g);
    if (fs::is_directory(*path) && fs::exists(fs::path(*path) / "config.json")) {
      ModelConfig c = load_model_config(*path);
      std::printf("model: %s (%s), %lld layers, hidden %lld, heads %lld/%lld, vocab %lld, context %lld\n",
                  c.architecture.c_str(), c.model_type.c_str(), (long long)c.n_layer, (long long)c.hidden_size,
                  (long long)c.n_head, (long long)c.n_kv_head, (long long)c.vocab_size, (long long)c.max_position);
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
  CLI::App* cmd = app.add_subcommand("forward", "run one forward pass and write the logits (tensor 'logits') to safetensors");
  cmd->add_option("--model", *model, "checkpoint directory")->required();
  auto* t = cmd->add_option("--text", *text, "text to encode with the checkpoint's tokenizer");
  auto* i = cmd->add_option("--ids", *ids, "comma-separated token ids");
  t->excludes(i);
  cmd->add_option("--out", *out, "output .safetensors file")->required();
  add_run_options(cmd, *run);
  cmd->callback([=, &g] {
    apply(g);
    MDL_CHECK(!text->empty() || !ids->empty(), "[forward] give --text or --ids");
    std::vector<int64_t> tokens = ids->empty() ? Tokenizer::from_file(*model).encode(*text) : parse_ids(*ids);
    MDL_CHECK(!tokens.empty(), "[forward] the text encodes to no tokens");
    Model m = load_model(*model, load_options(*run));
    torch::NoGradGuard no_grad;
    ModelInput in;
    in.input_ids = at::tensor(tokens, at::kLong).view({1, -1}).to(m->device());
    at::Tensor logits = m->forward(in).squeeze(0).to(at::kCPU, at::kFloat);  // (T, V) or (L)
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
  CLI::App* cmd = app.add_subcommand("generate", "generate text with a causal LM checkpoint");
  cmd->add_option("--model", *model, "checkpoint directory")->required();
  cmd->add_option("--prompt", *prompt, "prompt text")->required();
  cmd->add_option("--max-tokens", gen->max_tokens, "new tokens at most")->capture_default_str();
  cmd->add_option("--temperature", gen->temperature, "0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", gen->top_k, "sample among the k most likely tokens (0 = all)")->capture_default_str();
  cmd->add_option("--top-p", gen->top_p, "nucleus sampling threshold in (0, 1]")->capture_default_str();
  cmd->add_option("--seed", gen->seed, "sampling seed")->capture_default_str();
  cmd->add_option("--stop-id", gen->stop_token_ids, "token id(s) that end generation (default: the config's EOS)");
  cmd->add_flag("--no-cache", *no_cache, "recompute the whole sequence each step (reference path)");
  add_run_options(cmd, *run);
  cmd->callback([=, &g] {
    apply(g);
    validate(*gen);
    gen->use_cache = !*no_cache;
    Tokenizer tok = Tokenizer::from_file(*model);
    Model m = load_model(*model, load_options(*run));
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
    const double tps = r.decode_seconds > 0 ? (r.tokens.size() > 1 ? (r.tokens.size() - 1) / r.decode_seconds : 0) : 0;
    std::fprintf(stderr, "[generate] prompt %zu tokens, %zu new tokens, prefill %.1f ms, %.1f tokens/s, finish: %s\n",
                 ids.size(), r.tokens.size(), r.prefill_seconds * 1e3, tps, r.finish_reason.c_str());
  });
}

}  // namespace

void register_commands(CLI::App& app, GlobalOptions& globals) {
  register_init_model(app, globals);
  register_inspect(app, globals);
  register_tokenize(app, globals);
  register_forward(app, globals);
  register_generate(app, globals);
}

}  // namespace mdl::cli
