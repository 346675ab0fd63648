// Starts the real `mdl serve` on 127.0.0.1 and drives it with an HTTP client (cpp-httplib): completions
// with and without modules equal the library's generate(); a batch that mixes modules equals each
// request run alone; streaming, runtime module loading, chat, embeddings, metrics; every error case
// returns its status and JSON body while the server keeps serving; SIGTERM finishes what is in flight.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <sys/wait.h>
#include <torch/utils.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "mdl/backbones/generate.h"
#include "mdl/modules/module_set.h"
#include "mdl/serving/chat_template.h"
#include "mdl/serving/engine.h"
#include "mdl/tokenizers/tokenizer.h"
#include "modules/module_fixtures.h"
#include "serving/serve_util.h"
#include "test_util.h"

namespace mdl {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

using test::post;
using test::Process;
using test::start_server;

const httplib::Headers kAdmin = {{"Authorization", "Bearer test-admin-token"}};

class Serve : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir();
    model_ = *dir_ / "model";
    modules_ = *dir_ / "modules";
    const std::string init = std::string(std::getenv("MDL_BIN")) +
                             " init-model --arch llama --preset tiny --seed 3 --out " + model_ +
                             " > /dev/null";
    ASSERT_EQ(std::system(init.c_str()), 0);
    // A ChatML template, so /v1/chat/completions has something to render.
    json tc = json::parse(test::read_file(model_ + "/tokenizer_config.json"), nullptr, false);
    if (!tc.is_object()) tc = json::object();
    tc["chat_template"] =
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}";
    test::write_file(model_ + "/tokenizer_config.json", tc.dump());
    // LoRAs of ranks 2, 4, 8 and an adapter, all with random (non-zero) weights so that they matter.
    ModuleSet set(load_model(model_));
    for (const auto& [name, r] :
         std::vector<std::pair<std::string, int64_t>>{{"lora_a", 4}, {"lora_b", 8}, {"lora_c", 2}}) {
      ModuleConfig c;
      c.lora.r = r;
      c.lora.alpha = 2.0 * static_cast<double>(r);
      c.lora.init = "random";
      c.seed = static_cast<uint64_t>(r);
      c.targets.target_modules = {"all-linear"};
      set.add(name, c);
      set.save(name, modules_ + "/" + name);
    }
    test::save_random_adapters(model_, modules_, {"adapter_x", "adapter_y"}, 1, 0.2);
    server_ = new Process(start_server(model_, modules_, *dir_ / "port",
                                       {"--max-body-bytes", "65536", "--admin-token", "test-admin-token"}));
  }
  static void TearDownTestSuite() {
    if (server_ && server_->pid > 0) {
      kill(server_->pid, SIGKILL);
      waitpid(server_->pid, nullptr, 0);
    }
    delete server_;
    delete dir_;
  }

  /// What the library generates for `prompt` with `modules` active, applied in the order given (greedy
  /// unless told otherwise).
  static std::string library_text(const std::string& prompt, const std::vector<std::string>& modules,
                                  int64_t max_tokens, double temperature = 0, uint64_t seed = 0,
                                  bool ignore_eos = false) {
    ModuleSet set(load_model(model_));
    for (const auto& m : modules) {
      set.load(modules_ + "/" + m, m);
      // As the server holds LoRAs with its default --lora-bank-dtype float16: rounded to float16 values.
      if (set.config(m).type == "lora") set.round_tensors(m, at::kHalf);
    }
    Tokenizer tok = Tokenizer::from_file(model_);
    GenerateOptions o;
    o.max_tokens = max_tokens;
    o.temperature = temperature;
    o.seed = seed;
    o.ignore_eos = ignore_eos;
    GenerateResult r = generate(*set.model(), tok.encode(prompt), o);
    if (r.finish_reason == "stop") r.tokens.pop_back();
    return tok.decode(r.tokens);
  }

  static json complete(const std::string& model, const std::string& prompt, int64_t max_tokens,
                       double temperature = 0, int64_t seed = 0) {
    int status = 0;
    json r = post(server_->port, "/v1/completions",
                  json({{"model", model},
                        {"prompt", prompt},
                        {"max_tokens", max_tokens},
                        {"temperature", temperature},
                        {"seed", seed}}),
                  &status);
    EXPECT_EQ(status, 200) << r.dump();
    return r;
  }

  static test::TempDir* dir_;
  static std::string model_, modules_;
  static Process* server_;
};
test::TempDir* Serve::dir_ = nullptr;
std::string Serve::model_, Serve::modules_;
Process* Serve::server_ = nullptr;

TEST_F(Serve, CompletionsEqualTheLibrarysGenerate) {
  for (const std::string model : {"base", "lora_a", "adapter_x"}) {
    json r = complete(model, "the cat sat", 10);
    ASSERT_TRUE(r.contains("choices")) << r.dump();
    const std::string want = library_text(
        "the cat sat", model == "base" ? std::vector<std::string>{} : std::vector<std::string>{model}, 10);
    EXPECT_EQ(r["choices"][0]["text"].get<std::string>(), want) << model;
    EXPECT_EQ(r["object"], "text_completion");
    EXPECT_GT(r["usage"]["prompt_tokens"].get<int64_t>(), 0);
  }
  // The modules really change the output.
  EXPECT_NE(complete("lora_a", "the cat sat", 10)["choices"][0]["text"],
            complete("base", "the cat sat", 10)["choices"][0]["text"]);
}

TEST_F(Serve, MixedBatchEqualsEachRequestAlone) {
  const std::vector<std::string> models = {
      "base", "lora_a", "lora_b", "lora_c", "adapter_x", "lora_a:0.5 + lora_b:0.5", "lora_c", "lora_b"};
  const std::vector<std::string> prompts = {"a dog", "the cat sat on", "one",    "my fox ran", "her",
                                            "the",   "a cat",          "dog dog"};
  std::vector<std::string> alone;
  for (size_t i = 0; i < models.size(); ++i)
    alone.push_back(complete(models[i], prompts[i], 12, i % 2 ? 0.8 : 0.0,
                             static_cast<int64_t>(i))["choices"][0]["text"]);
  std::vector<std::future<json>> together;
  for (size_t i = 0; i < models.size(); ++i)
    together.push_back(std::async(std::launch::async, [&, i] {
      return complete(models[i], prompts[i], 12, i % 2 ? 0.8 : 0.0, static_cast<int64_t>(i));
    }));
  for (size_t i = 0; i < models.size(); ++i)
    EXPECT_EQ(together[i].get()["choices"][0]["text"], alone[i]) << models[i];
  // The engine did batch them.
  httplib::Client c("127.0.0.1", server_->port);
  auto m = c.Get("/metrics");
  ASSERT_TRUE(m);
  EXPECT_NE(m->body.find("mdl_batch_size_mean"), std::string::npos);
  EXPECT_NE(m->body.find("mdl_module_cache_hits_total"), std::string::npos);
}

// Requests submitted together join the same decoding steps (a mixed batch through the LoRA bank) and
// give the tokens each gets alone, with the float16 bank (the default) and the float32 one; a bad request
// among them is refused before any is queued.
TEST_F(Serve, EngineRequestsSubmittedTogetherEqualEachAlone) {
  const std::vector<std::string> models = {"lora_a", "lora_b", "base", "lora_c", "lora_a:0.5 + lora_b:0.5",
                                           "lora_b"};
  for (const std::string dtype : {"float16", "float32"}) {
    EngineOptions o;
    o.model_dir = model_;
    o.modules_dir = modules_;
    o.lora_bank_dtype = dtype;
    Engine engine(load_model(model_), Tokenizer::from_file(model_), o);
    auto request = [&](size_t i) {
      CompletionRequest r;
      r.prompt = engine.tokenizer().encode(std::string("the cat ") + std::to_string(i));
      r.sampling.max_tokens = 10;
      r.sampling.stop_token_ids = {-1};
      r.modules = engine.resolve(models[i]);
      return r;
    };
    std::vector<std::vector<int64_t>> alone;
    for (size_t i = 0; i < models.size(); ++i) alone.push_back(engine.submit(request(i)).get().tokens);
    const int64_t steps_before = engine.stats().decode_steps;
    std::vector<CompletionRequest> batch;
    for (size_t i = 0; i < models.size(); ++i) batch.push_back(request(i));
    auto together = engine.submit(std::move(batch));
    for (size_t i = 0; i < models.size(); ++i)
      EXPECT_EQ(together[i].get().tokens, alone[i]) << dtype << " " << models[i];
    EXPECT_EQ(engine.stats().decode_steps - steps_before, 9) << "all six decoded in the same 9 steps";
    std::vector<CompletionRequest> bad;
    bad.push_back(request(0));
    bad.emplace_back();  // an empty prompt
    const int64_t requests_before = engine.stats().requests;
    EXPECT_THROW_WITH(engine.submit(std::move(bad)), "the prompt is empty");
    EXPECT_EQ(engine.stats().requests, requests_before);
  }
  EngineOptions wrong;
  wrong.lora_bank_dtype = "int8";
  EXPECT_THROW_WITH(Engine(load_model(model_), Tokenizer::from_file(model_), wrong), "--lora-bank-dtype",
                    "int8");
}

// One decoding batch whose requests stack the same two adapters in opposite orders: each request gets
// what the library gives with the adapters applied in its written order, though the engine loaded them in
// the other one; the orders differ.
TEST_F(Serve, StacksInOneBatchApplyInEachRequestsOrder) {
  EngineOptions o;
  o.model_dir = model_;
  o.modules_dir = modules_;
  Engine engine(load_model(model_), Tokenizer::from_file(model_), o);
  engine.resolve("adapter_y");  // loaded first: attachment order y, x
  engine.resolve("adapter_x");
  const std::vector<std::string> models = {"stack(adapter_x, adapter_y)", "stack(adapter_y, adapter_x)",
                                           "lora_a", "stack(adapter_x, adapter_y)"};
  std::vector<CompletionRequest> batch;
  for (const auto& m : models) {
    CompletionRequest r;
    r.prompt = engine.tokenizer().encode("the cat");
    r.sampling.max_tokens = 12;
    r.sampling.ignore_eos = true;
    r.modules = engine.resolve(m);
    batch.push_back(std::move(r));
  }
  const int64_t steps = engine.stats().decode_steps;
  auto futures = engine.submit(std::move(batch));
  std::vector<std::string> texts;
  for (auto& f : futures) texts.push_back(f.get().text);
  EXPECT_EQ(engine.stats().decode_steps - steps, 11) << "all four decoded in the same steps";
  EXPECT_EQ(texts[0], library_text("the cat", {"adapter_x", "adapter_y"}, 12, 0, 0, true));
  EXPECT_EQ(texts[1], library_text("the cat", {"adapter_y", "adapter_x"}, 12, 0, 0, true));
  EXPECT_EQ(texts[3], texts[0]);
  EXPECT_NE(texts[0], texts[1]) << "the two orders are different functions";
  int status = 0;  // and over HTTP, where the server's cache loaded them in whatever order requests came
  const json r = post(server_->port, "/v1/completions",
                      json({{"model", "stack(adapter_y, adapter_x)"},
                            {"prompt", "the cat"},
                            {"max_tokens", 12},
                            {"temperature", 0},
                            {"ignore_eos", true}}),
                      &status);
  ASSERT_EQ(status, 200) << r.dump();
  EXPECT_EQ(r["choices"][0]["text"], texts[1]);
}

// LoRAX's adapter_id names the module as model does; n = 1, zero penalties and logprobs false are accepted.
TEST_F(Serve, AdapterIdIsModelAndNeutralOpenAiParametersAreAccepted) {
  int status = 0;
  const json r = post(server_->port, "/v1/completions",
                      json({{"adapter_id", "lora_b"},
                            {"prompt", "my fox"},
                            {"max_tokens", 8},
                            {"temperature", 0},
                            {"n", 1},
                            {"logprobs", false},
                            {"presence_penalty", 0},
                            {"frequency_penalty", 0.0}}),
                      &status);
  ASSERT_EQ(status, 200) << r.dump();
  EXPECT_EQ(r["choices"][0]["text"], complete("lora_b", "my fox", 8)["choices"][0]["text"]);
}

// n choices (choice k sampled with seed + k), a list of prompts (choice i * n + k), penalties and logprobs
// as OpenAI defines them.
TEST_F(Serve, NChoicesPromptListsPenaltiesAndLogprobs) {
  int status = 0;
  json r = post(server_->port, "/v1/completions",
                json({{"model", "lora_a"},
                      {"prompt", {"the cat sat", "my fox"}},
                      {"n", 2},
                      {"max_tokens", 6},
                      {"temperature", 1.0},
                      {"seed", 5},
                      {"ignore_eos", true}}),
                &status);
  ASSERT_EQ(status, 200) << r.dump();
  ASSERT_EQ(r["choices"].size(), 4u);
  const std::vector<std::string> prompts = {"the cat sat", "my fox"};
  int64_t prompt_tokens = 0;
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(r["choices"][i]["index"], i);
    EXPECT_EQ(r["choices"][i]["text"], library_text(prompts[i / 2], {"lora_a"}, 6, 1.0, 5 + i % 2, true))
        << "choice " << i;
  }
  for (const auto& p : prompts)
    prompt_tokens += static_cast<int64_t>(Tokenizer::from_file(model_).encode(p).size());
  EXPECT_EQ(r["usage"]["prompt_tokens"], prompt_tokens);
  EXPECT_EQ(r["usage"]["completion_tokens"], 4 * 6);

  // Penalties reach the sampler: the server's tokens are the library's with the same options.
  r = post(server_->port, "/v1/completions",
           json({{"prompt", "the cat sat"},
                 {"max_tokens", 12},
                 {"temperature", 0},
                 {"frequency_penalty", 1.5},
                 {"presence_penalty", 0.5},
                 {"ignore_eos", true},
                 {"logprobs", 3}}),
           &status);
  ASSERT_EQ(status, 200) << r.dump();
  Tokenizer tok = Tokenizer::from_file(model_);
  GenerateOptions o;
  o.max_tokens = 12;
  o.frequency_penalty = 1.5;
  o.presence_penalty = 0.5;
  o.ignore_eos = true;
  o.logprobs = 3;
  Model m = load_model(model_);
  std::vector<TokenLogprob> want;
  Sampler reference(o);
  {
    // The reference: generate() with the same options, each step's logprobs from its sampler's twin.
    const GenerateResult g = generate(*m, tok.encode("the cat sat"), o);
    EXPECT_EQ(r["choices"][0]["text"], tok.decode(g.tokens));
    GenerateOptions plain = o;
    plain.frequency_penalty = plain.presence_penalty = 0;
    EXPECT_NE(tok.decode(generate(*m, tok.encode("the cat sat"), plain).tokens), tok.decode(g.tokens))
        << "the penalties change this text (else the test shows nothing)";
    std::vector<int64_t> seq = tok.encode("the cat sat");
    torch::NoGradGuard ng;
    for (int64_t t : g.tokens) {
      ModelInput in;
      in.input_ids = at::tensor(seq, at::kLong).view({1, -1});
      const at::Tensor logits = m->forward(in);
      EXPECT_EQ(reference.sample(logits[0][logits.size(1) - 1]), t);
      want.push_back(reference.last());
      seq.push_back(t);
    }
  }
  const json& lp = r["choices"][0]["logprobs"];
  ASSERT_EQ(lp["token_logprobs"].size(), want.size()) << lp.dump();
  std::string joined;
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_NEAR(lp["token_logprobs"][i].get<double>(), want[i].logprob, 1e-3) << i;
    // Keyed by token text, as OpenAI's: ids whose text is the same (partial characters) share a key.
    const json& top = lp["top_logprobs"][i];
    EXPECT_GE(top.size(), 1u);
    EXPECT_LE(top.size(), 3u);
    double best = -1e300;
    for (const auto& [k, v] : top.items()) best = std::max(best, v.get<double>());
    EXPECT_NEAR(best, want[i].top[0].second, 1e-3) << i;
    EXPECT_EQ(lp["text_offset"][i], joined.size());
    joined += lp["tokens"][i].get<std::string>();
  }
  // Chat: logprobs true with top_logprobs, as content entries with bytes.
  r = post(server_->port, "/v1/chat/completions",
           json({{"messages", {{{"role", "user"}, {"content", "hi"}}}},
                 {"max_tokens", 4},
                 {"temperature", 0},
                 {"ignore_eos", true},
                 {"logprobs", true},
                 {"top_logprobs", 2}}),
           &status);
  ASSERT_EQ(status, 200) << r.dump();
  const json& content = r["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), 4u) << r.dump();
  for (const auto& c : content) {
    EXPECT_LE(c["logprob"].get<double>(), 0.0);
    EXPECT_EQ(c["top_logprobs"].size(), 2u);
    EXPECT_NEAR(c["top_logprobs"][0]["logprob"].get<double>(), c["logprob"].get<double>(), 1e-9)
        << "greedy picks the most likely token";
    EXPECT_EQ(c["bytes"].size(), c["token"].get<std::string>().size());
  }
}

// /v1/models as vLLM lists a base and its LoRAs; vLLM's runtime LoRA endpoints are aliases of mdl's.
TEST_F(Serve, ModelsListAndVllmLoraEndpoints) {
  httplib::Client c("127.0.0.1", server_->port);
  json models = json::parse(c.Get("/v1/models")->body);
  const json& base = models["data"][0];
  EXPECT_EQ(base["id"], model_) << "the base is named by its checkpoint";
  EXPECT_EQ(base["root"], model_);
  EXPECT_TRUE(base["parent"].is_null());
  EXPECT_GT(base["created"].get<int64_t>(), 0);
  bool seen = false;
  for (const auto& m : models["data"])
    if (m["id"] == "lora_a") {
      seen = true;
      EXPECT_EQ(m["parent"], model_);
      EXPECT_EQ(m["root"], modules_ + "/lora_a");
    }
  EXPECT_TRUE(seen) << models.dump();
  EXPECT_EQ(complete(model_, "my fox", 6)["choices"][0]["text"],
            complete("base", "my fox", 6)["choices"][0]["text"]);

  auto r =
      c.Post("/v1/load_lora_adapter", kAdmin,
             json({{"lora_name", "vllm_b"}, {"lora_path", modules_ + "/lora_b"}}).dump(), "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200) << r->body;
  EXPECT_NE(r->body.find("Success: LoRA adapter 'vllm_b' added successfully."), std::string::npos) << r->body;
  EXPECT_EQ(complete("vllm_b", "my fox", 8)["choices"][0]["text"],
            complete("lora_b", "my fox", 8)["choices"][0]["text"]);
  models = json::parse(c.Get("/v1/models")->body);
  bool listed = false;
  for (const auto& m : models["data"])
    if (m["id"] == "vllm_b") {
      listed = true;
      EXPECT_EQ(m["root"], fs::canonical(modules_ + "/lora_b").string());
    }
  EXPECT_TRUE(listed);
  r = c.Post("/v1/load_lora_adapter", json({{"lora_name", "x"}, {"lora_path", modules_ + "/lora_b"}}).dump(),
             "application/json");
  EXPECT_EQ(r->status, 401) << "the admin token guards it as it does /v1/modules";
  r = c.Post("/v1/unload_lora_adapter", kAdmin, json({{"lora_name", "vllm_b"}}).dump(), "application/json");
  EXPECT_EQ(r->status, 200) << r->body;
  int status = 0;
  post(server_->port, "/v1/completions", json({{"model", "vllm_b"}, {"prompt", "x"}}), &status);
  EXPECT_EQ(status, 404);
}

TEST_F(Serve, StreamingSendsTheSameTextAsEvents) {
  const std::string whole = complete("lora_b", "the cat sat", 16)["choices"][0]["text"];
  httplib::Client c("127.0.0.1", server_->port);
  std::string body;
  auto r = c.Post("/v1/completions",
                  json({{"model", "lora_b"},
                        {"prompt", "the cat sat"},
                        {"max_tokens", 16},
                        {"temperature", 0},
                        {"stream", true}})
                      .dump(),
                  "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_NE(r->get_header_value("Content-Type").find("text/event-stream"), std::string::npos);
  std::string text;
  size_t events = 0;
  bool done = false, finished = false;
  for (size_t at = 0; (at = r->body.find("data: ", at)) != std::string::npos; at += 6) {
    const std::string line = r->body.substr(at + 6, r->body.find("\n\n", at) - at - 6);
    if (line == "[DONE]") {
      done = true;
      continue;
    }
    json e = json::parse(line);
    text += e["choices"][0]["text"].get<std::string>();
    finished = finished || !e["choices"][0]["finish_reason"].is_null();
    ++events;
  }
  EXPECT_TRUE(done && finished);
  EXPECT_GE(events, 2u);
  EXPECT_EQ(text, whole);
}

TEST_F(Serve, ModulesLoadAndUnloadAtRuntime) {
  int status = 0;
  json r = post(server_->port, "/v1/modules", json({{"name", "extra"}, {"path", modules_ + "/lora_b"}}),
                &status, kAdmin);
  EXPECT_EQ(status, 201) << r.dump();
  httplib::Client c("127.0.0.1", server_->port);
  auto models = c.Get("/v1/models");
  ASSERT_TRUE(models);
  EXPECT_NE(models->body.find("\"extra\""), std::string::npos);
  EXPECT_NE(models->body.find("\"lora_c\""), std::string::npos);  // offered by the modules directory
  EXPECT_EQ(complete("extra", "my fox", 8)["choices"][0]["text"],
            complete("lora_b", "my fox", 8)["choices"][0]["text"]);
  r = post(server_->port, "/v1/modules", json({{"name", "extra"}, {"path", modules_ + "/lora_b"}}), &status,
           kAdmin);
  EXPECT_EQ(status, 409) << r.dump();
  auto del = c.Delete("/v1/modules/extra", kAdmin);
  ASSERT_TRUE(del);
  EXPECT_EQ(del->status, 200);
  r = post(server_->port, "/v1/completions", json({{"model", "extra"}, {"prompt", "x"}}), &status);
  EXPECT_EQ(status, 404);
  EXPECT_EQ(r["error"]["param"], "model");
  del = c.Delete("/v1/modules/extra", kAdmin);
  EXPECT_EQ(del->status, 404);
}

TEST_F(Serve, ChatEmbeddingsAndMetrics) {
  int status = 0;
  json chat = post(
      server_->port, "/v1/chat/completions",
      json({{"messages", {{{"role", "user"}, {"content", "hello"}}}}, {"max_tokens", 6}, {"temperature", 0}}),
      &status);
  ASSERT_EQ(status, 200) << chat.dump();
  EXPECT_EQ(chat["object"], "chat.completion");
  // The same as a completion of the rendered prompt's tokens.
  Tokenizer tok = Tokenizer::from_file(model_);
  const auto ids = tok.encode(render_chat(ChatFormat::chatml, {{"user", "hello"}}), false);
  json plain = post(server_->port, "/v1/completions",
                    json({{"prompt", ids}, {"max_tokens", 6}, {"temperature", 0}}), &status);
  EXPECT_EQ(chat["choices"][0]["message"]["content"], plain["choices"][0]["text"]);
  EXPECT_EQ(chat["choices"][0]["message"]["role"], "assistant");
  // Streamed, the role comes in the first chunk only (as OpenAI streams), and the text is the same.
  httplib::Client sc("127.0.0.1", server_->port);
  auto streamed = sc.Post("/v1/chat/completions",
                          json({{"messages", {{{"role", "user"}, {"content", "hello"}}}},
                                {"max_tokens", 6},
                                {"temperature", 0},
                                {"stream", true}})
                              .dump(),
                          "application/json");
  ASSERT_TRUE(streamed);
  std::string text;
  size_t chunks = 0, with_role = 0;
  for (size_t at = 0; (at = streamed->body.find("data: ", at)) != std::string::npos; at += 6) {
    const std::string line = streamed->body.substr(at + 6, streamed->body.find("\n\n", at) - at - 6);
    if (line == "[DONE]") continue;
    const json delta = json::parse(line)["choices"][0]["delta"];
    if (delta.contains("role")) {
      EXPECT_EQ(chunks, 0u) << "the role in chunk " << chunks;
      ++with_role;
    }
    text += delta.value("content", "");
    ++chunks;
  }
  EXPECT_EQ(with_role, 1u);
  EXPECT_GE(chunks, 2u);
  EXPECT_EQ(text, chat["choices"][0]["message"]["content"]);
  json emb = post(server_->port, "/v1/embeddings", json({{"input", {"a cat", "a dog"}}, {"model", "lora_a"}}),
                  &status);
  ASSERT_EQ(status, 200) << emb.dump();
  ASSERT_EQ(emb["data"].size(), 2u);
  EXPECT_EQ(emb["data"][0]["embedding"].size(),
            static_cast<size_t>(load_model(model_)->config().hidden_size));
  httplib::Client c("127.0.0.1", server_->port);
  auto m = c.Get("/metrics");
  ASSERT_TRUE(m);
  for (const char* name :
       {"mdl_requests_total", "mdl_generated_tokens_total", "mdl_tokens_per_second", "mdl_queue_length",
        "mdl_module_cache_evictions_total", "# TYPE mdl_requests_total counter",
        "# TYPE mdl_time_to_first_token_seconds histogram",
        "mdl_time_to_first_token_seconds_bucket{le=\"+Inf\"}", "mdl_time_per_output_token_seconds_count",
        "mdl_queue_time_seconds_sum", "mdl_module_requests_total{module=\"base\"}",
        "mdl_module_generated_tokens_total{module=\"base\"}"})
    EXPECT_NE(m->body.find(name), std::string::npos) << name;
  // A request with a module counts under its name; the histograms' +Inf bucket holds every observation.
  complete("lora_c", "the dog", 3);
  m = c.Get("/metrics");
  ASSERT_TRUE(m);
  EXPECT_NE(m->body.find("mdl_module_requests_total{module=\"lora_c\"} "), std::string::npos) << m->body;
  auto value = [&](const std::string& series) {
    const size_t at = m->body.find(series + " ");
    return at == std::string::npos ? -1.0 : std::stod(m->body.substr(at + series.size() + 1));
  };
  EXPECT_GE(value("mdl_module_generated_tokens_total{module=\"lora_c\"}"), 1.0);
  EXPECT_EQ(value("mdl_time_to_first_token_seconds_bucket{le=\"+Inf\"}"),
            value("mdl_time_to_first_token_seconds_count"));
  EXPECT_GE(value("mdl_time_to_first_token_seconds_count"), 2.0);  // at least the chat and this request
}

TEST_F(Serve, EveryErrorIsAJsonStatusAndTheServerKeepsServing) {
  struct Case {
    std::string path, body;
    int status;
    std::string param, message;
  };
  const std::string long_prompt(100000, 'a');
  const std::vector<Case> cases = {
      {"/v1/completions", "{not json", 400, "", "not valid JSON"},
      {"/v1/completions", "[1, 2]", 400, "", "must be a JSON object"},
      {"/v1/completions", json({{"max_tokens", 3}}).dump(), 400, "prompt", "missing field 'prompt'"},
      {"/v1/completions", json({{"prompt", "a"}, {"model", "no_such_module"}}).dump(), 404, "model",
       "unknown module 'no_such_module'"},
      {"/v1/completions", json({{"prompt", "a"}, {"model", "../model"}}).dump(), 400, "model",
       "invalid module name"},
      {"/v1/completions", json({{"prompt", "a"}, {"model", "ties(lora_a"}}).dump(), 400, "model", "column"},
      {"/v1/completions", json({{"prompt", "a"}, {"model", "avg(adapter_x, lora_a)"}}).dump(), 400, "model",
       "additive"},
      {"/v1/completions", json({{"prompt", long_prompt.substr(0, 3000)}}).dump(), 400, "prompt",
       "the context holds"},
      {"/v1/completions", json({{"prompt", "a"}, {"temperature", -1}}).dump(), 400, "temperature",
       "'temperature' must be"},
      // OpenAI parameters out of range, or in combinations mdl does not serve, are refused, never ignored.
      {"/v1/completions", json({{"prompt", "a"}, {"n", 17}}).dump(), 400, "n", "'n' must be 1 to 16"},
      {"/v1/completions", json({{"prompt", "a"}, {"n", 2}, {"stream", true}}).dump(), 400, "n",
       "a stream carries one choice here"},
      {"/v1/completions", json({{"prompt", {"a", "b"}}, {"stream", true}}).dump(), 400, "prompt",
       "a stream carries one choice here"},
      {"/v1/completions", json({{"prompt", "a"}, {"logprobs", 2}, {"stream", true}}).dump(), 400, "logprobs",
       "logprobs are returned without streaming"},
      {"/v1/completions", json({{"prompt", "a"}, {"logprobs", 30}}).dump(), 400, "logprobs",
       "the number of top tokens to list, 0 to 20"},
      {"/v1/chat/completions",
       json({{"messages", {{{"role", "user"}, {"content", "a"}}}}, {"top_logprobs", 2}}).dump(), 400,
       "top_logprobs", "'top_logprobs' needs 'logprobs': true"},
      {"/v1/completions", json({{"prompt", "a"}, {"presence_penalty", 2.5}}).dump(), 400, "presence_penalty",
       "must be in [-2, 2]"},
      {"/v1/completions", json({{"prompt", "a"}, {"frequency_penalty", -3}}).dump(), 400, "frequency_penalty",
       "must be in [-2, 2]"},
      {"/v1/completions", json({{"prompt", {"a", 3}}}).dump(), 400, "prompt", "prompt[1] is neither"},
      {"/v1/completions", json({{"prompt", "a"}, {"model", "lora_a"}, {"adapter_id", "lora_b"}}).dump(), 400,
       "adapter_id", "name different modules"},
      {"/v1/completions", json({{"prompt", "a"}, {"top_p", 2}}).dump(), 400, "top_p",
       "'top_p' must be in (0, 1]"},
      {"/v1/completions", json({{"prompt", "a"}, {"max_tokens", 0}}).dump(), 400, "max_tokens",
       "'max_tokens' must be >= 1"},
      {"/v1/completions", json({{"prompt", "a"}, {"max_tokens", "ten"}}).dump(), 400, "max_tokens",
       "must be an integer, found string"},
      {"/v1/completions", json({{"prompt", "a"}, {"modules", {"lora_a:x"}}}).dump(), 400, "modules[0]",
       "must be a finite number"},
      {"/v1/completions", json({{"prompt", {1, -5}}}).dump(), 400, "prompt", "token ids must be integers"},
      {"/v1/completions", json({{"prompt", long_prompt}}).dump(), 413, "", "over the limit"},
      {"/v1/classify", json({{"input", "a"}}).dump(), 400, "model", "no sequence classification head"},
      {"/v1/embeddings", json({{"input", 3}}).dump(), 400, "input", "'input' must be a string or a list"},
      {"/v1/nothing", "{}", 404, "", "no such endpoint"},
  };
  for (const auto& c : cases) {
    int status = 0;
    json r = post(server_->port, c.path, c.body, &status);
    EXPECT_EQ(status, c.status) << c.path << " " << c.body.substr(0, 80) << " -> " << r.dump().substr(0, 300);
    ASSERT_TRUE(r.is_object() && r.contains("error")) << c.body.substr(0, 80) << " -> not a JSON error";
    EXPECT_NE(r["error"]["message"].get<std::string>().find(c.message), std::string::npos)
        << c.body.substr(0, 80) << " -> " << r["error"]["message"];
    if (!c.param.empty()) {
      EXPECT_EQ(r["error"]["param"], c.param) << c.body.substr(0, 80);
    }
  }
  EXPECT_EQ(complete("lora_a", "the cat", 4)["choices"].size(), 1u);  // still serving
}

// 64 clients, mixed modules, for a bounded time (MDL_LOAD_TEST_SECONDS, default 30): no request fails
// and the server's resident memory does not grow after the warm-up.
TEST_F(Serve, LoadTestSixtyFourClients) {
  const char* env = std::getenv("MDL_LOAD_TEST_SECONDS");
  const double seconds = env ? std::atof(env) : 30.0;
  auto rss = [&] {
    std::ifstream in("/proc/" + std::to_string(server_->pid) + "/status");
    std::string line;
    while (std::getline(in, line))
      if (line.rfind("VmRSS:", 0) == 0) return std::stol(line.substr(6));
    return 0L;
  };
  const std::vector<std::string> models = {"base",   "lora_a",    "lora_b",
                                           "lora_c", "adapter_x", "lora_a:0.3 + lora_c:0.7"};
  constexpr int kMaxPerClient = 2000;  // bounded in count as well as in time
  std::atomic<int64_t> ok{0}, failed{0};
  std::mutex first_failure_mu;
  std::string first_failure;
  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  long warm = 0;
  std::vector<std::thread> clients;
  for (int i = 0; i < 64; ++i)
    clients.emplace_back([&, i] {
      httplib::Client c("127.0.0.1", server_->port);
      c.set_read_timeout(120);
      // Half the clients keep their connection, half open one per request (the accept path under load).
      c.set_keep_alive(i % 2 == 0);
      for (int n = 0; n < kMaxPerClient && elapsed() < seconds; ++n) {
        const json body = {{"model", models[static_cast<size_t>(i + n) % models.size()]},
                           {"prompt", "the cat"},
                           {"max_tokens", 4 + (i + n) % 8},
                           {"temperature", 0.7},
                           {"seed", i * 1000 + n}};
        auto r = c.Post("/v1/completions", body.dump(), "application/json");
        if (r && r->status == 200) {
          ++ok;
        } else if (failed++ == 0) {
          std::lock_guard<std::mutex> lk(first_failure_mu);
          first_failure = r ? "status " + std::to_string(r->status) + ": " + r->body.substr(0, 200)
                            : "no response: " + httplib::to_string(r.error());
        }
      }
    });
  // Warm once every client has had a few answers (a state, not a time): caches and pools have grown.
  test::wait_until([&] { return ok.load() + failed.load() >= 4 * 64 || elapsed() >= seconds; }, server_->pid);
  warm = rss();
  for (auto& t : clients) t.join();
  const long end = rss();
  std::printf("[load] %lld requests in %.0f s (%lld failed), RSS %ld -> %ld KiB\n",
              static_cast<long long>(ok.load()), seconds, static_cast<long long>(failed.load()), warm, end);
  EXPECT_EQ(failed.load(), 0) << "the first: " << first_failure;
  EXPECT_GT(ok.load(), 64);
  EXPECT_LT(static_cast<double>(end), 1.25 * static_cast<double>(warm)) << "resident memory grew";
}

/// Connections waiting to be accepted on the listening socket of `port` (/proc/net/tcp's rx_queue of a
/// LISTEN entry), or -1 when there is none.
int listen_queue(int port) {
  std::ifstream in("/proc/net/tcp");
  std::string line;
  std::getline(in, line);  // header
  while (std::getline(in, line)) {
    std::istringstream f(line);
    std::string sl, local, remote, state, queues;
    f >> sl >> local >> remote >> state >> queues;
    if (state != "0A" || std::stoi(local.substr(local.find(':') + 1), nullptr, 16) != port)
      continue;                                                          // 0A: LISTEN
    return std::stoi(queues.substr(queues.find(':') + 1), nullptr, 16);  // tx_queue:rx_queue
  }
  return -1;
}

// A burst of new connections while the server cannot accept (stopped with SIGSTOP, as a busy accept
// thread would be): the kernel queues every one, and each is answered once the server runs again.
// httplib listens with a backlog of 5; before mdl raised it, connections past it were reset.
TEST_F(Serve, ABurstOfConnectionsIsQueuedNotReset) {
  constexpr int kClients = 96;
  ASSERT_EQ(kill(server_->pid, SIGSTOP), 0);
  // kill() only sends the signal: wait for the report that every thread has stopped, or an accept thread
  // still running could take a connection out of the queue before it stops.
  siginfo_t stopped{};
  ASSERT_EQ(waitid(P_PID, static_cast<id_t>(server_->pid), &stopped, WSTOPPED), 0);
  ASSERT_EQ(stopped.si_code, CLD_STOPPED);
  std::vector<std::future<int>> replies;
  for (int i = 0; i < kClients; ++i)
    replies.push_back(std::async(std::launch::async, [&] {
      httplib::Client c("127.0.0.1", server_->port);
      c.set_read_timeout(120);
      auto r = c.Get("/health");
      return r ? r->status : -static_cast<int>(r.error());
    }));
  // Wait until the kernel holds them all (with a backlog of 5 it never does: the limit then ends it).
  const bool queued =
      test::wait_until([&] { return listen_queue(server_->port) >= kClients; }, -1, std::chrono::seconds(30));
  ASSERT_EQ(kill(server_->pid, SIGCONT), 0);
  EXPECT_TRUE(queued) << listen_queue(server_->port) << " connections queued";
  int ok = 0;
  std::map<int, int> other;
  for (auto& r : replies) {
    const int status = r.get();
    status == 200 ? ++ok : ++other[status];
  }
  EXPECT_EQ(ok, kClients) << "statuses other than 200 (negative: httplib errors): "
                          << testing::PrintToString(other);
}

// Chat on a checkpoint without a chat template: the error says which template is missing and how to give
// one; given with --chat-template FILE, chat works.
TEST(ServeChat, AMissingTemplateSaysHowToGiveOneAndAFileGivesIt) {
  test::TempDir dir;
  const std::string model = dir / "model";
  ASSERT_EQ(std::system((std::string(std::getenv("MDL_BIN")) + " init-model --arch llama --out " + model +
                         " > /dev/null")
                            .c_str()),
            0);
  std::filesystem::create_directories(dir / "modules");
  const json request = {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"max_tokens", 3}};
  {
    Process server = start_server(model, dir / "modules", dir / "port1", {});
    int status = 0;
    const json r = post(server.port, "/v1/chat/completions", request, &status);
    EXPECT_EQ(status, 400) << r.dump();
    const std::string message = r["error"]["message"];
    EXPECT_NE(message.find("has no chat template (no chat_template in its tokenizer_config.json)"),
              std::string::npos)
        << message;
    EXPECT_NE(message.find("--chat-template FILE"), std::string::npos) << message;
    kill(server.pid, SIGTERM);
    waitpid(server.pid, nullptr, 0);
  }
  test::write_file(
      dir / "chatml.jinja",
      "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}");
  Process server =
      start_server(model, dir / "modules", dir / "port2", {"--chat-template", dir / "chatml.jinja"});
  int status = 0;
  const json r = post(server.port, "/v1/chat/completions", request, &status);
  EXPECT_EQ(status, 200) << r.dump();
  EXPECT_EQ(r["choices"][0]["message"]["role"], "assistant");
  kill(server.pid, SIGTERM);
  waitpid(server.pid, nullptr, 0);
}

// An encoder: /v1/classify on a BERT sequence classifier gives, per text, the library's probabilities.
TEST(ServeEncoder, ClassifyEqualsTheLibrarysForward) {
  test::TempDir dir;
  const std::string model = dir / "bert";
  ASSERT_EQ(std::system((std::string(std::getenv("MDL_BIN")) +
                         " init-model --arch bert --head sequence_classification "
                         "--num-labels 3 --out " +
                         model + " > /dev/null")
                            .c_str()),
            0);
  fs::create_directories(dir / "modules");
  {  // a module trained on named classes: /v1/classify with it answers with its names
    ModuleSet set(load_model(model));
    set.add("sentiment", ModuleConfig());
    set.set_labels("sentiment", {"negative", "neutral", "positive"});
    set.save("sentiment", dir / "modules/sentiment");
  }
  Process p = start_server(model, dir / "modules", dir / "port");
  int status = 0;
  const std::vector<std::string> texts = {"a cat sat", "the dog"};
  json named = post(p.port, "/v1/classify", json({{"input", texts}, {"model", "sentiment"}}), &status);
  ASSERT_EQ(status, 200) << named.dump();
  for (const auto& row : named["data"]) {
    const std::vector<std::string> names = {"negative", "neutral", "positive"};
    EXPECT_EQ(row["label"], names.at(row["label_id"].get<size_t>())) << row.dump();
  }
  json r = post(p.port, "/v1/classify", json({{"input", texts}}), &status);
  kill(p.pid, SIGTERM);
  waitpid(p.pid, nullptr, 0);
  ASSERT_EQ(status, 200) << r.dump();
  ASSERT_EQ(r["data"].size(), 2u);
  Model m = load_model(model);
  Tokenizer tok = Tokenizer::from_file(model);
  torch::NoGradGuard g;
  for (size_t i = 0; i < texts.size(); ++i) {
    ModelInput in;
    in.input_ids = at::tensor(tok.encode(texts[i]), at::kLong).view({1, -1});
    at::Tensor probs = at::softmax(m->forward(in)[0], -1);
    const auto& got = r["data"][i];
    ASSERT_EQ(got["scores"].size(), 3u);
    for (int64_t c = 0; c < 3; ++c)
      EXPECT_NEAR(got["scores"][c].get<double>(), probs[c].item<double>(), 1e-5);
    EXPECT_EQ(got["label_id"].get<int64_t>(), probs.argmax().item<int64_t>());
  }
}

// SIGTERM under load: 64 clients stream completions back to back; the signal comes once every client
// has seen a first event. Every response that began (status 200) ends with its final event and [DONE];
// the others are refused whole (503) or find the server gone. The server exits 0.
TEST_F(Serve, SigtermUnderLoadEndsEveryStartedStream) {
  test::TempDir dir;
  Process p = start_server(model_, modules_, dir / "port");
  ASSERT_GT(p.port, 0);
  constexpr int kClients = 64;
  std::atomic<int> started{0}, cut{0}, complete{0}, refused{0}, no_response{0};
  std::mutex first_cut_mu;
  std::string first_cut;
  std::promise<void> all_started;
  std::once_flag once;
  std::vector<std::thread> clients;
  for (int i = 0; i < kClients; ++i)
    clients.emplace_back([&, i] {
      bool counted = false;
      for (int n = 0; n < 1000; ++n) {  // bounded; ends at the first refusal or failure
        httplib::Client c("127.0.0.1", p.port);
        c.set_read_timeout(120);
        httplib::Request req;
        req.method = "POST";
        req.path = "/v1/completions";
        req.set_header("Content-Type", "application/json");
        req.body = json({{"model", i % 2 ? "lora_a" : "base"},
                         {"prompt", "the cat"},
                         {"max_tokens", 24},
                         {"ignore_eos", true},
                         {"temperature", 0.7},
                         {"seed", i * 1000 + n},
                         {"stream", true}})
                       .dump();
        std::string body;
        req.content_receiver = [&](const char* data, size_t len, uint64_t, uint64_t) {
          body.append(data, len);
          if (!counted && body.find("\n\n") != std::string::npos) {
            counted = true;
            if (++started == kClients) std::call_once(once, [&] { all_started.set_value(); });
          }
          return true;
        };
        httplib::Response res;
        httplib::Error error = httplib::Error::Success;
        const bool sent = c.send(req, res, error);
        const bool ended = body.size() >= 14 && body.compare(body.size() - 14, 14, "data: [DONE]\n\n") == 0;
        if (sent && res.status == 200 && ended) {
          ++complete;
          continue;
        }
        if (sent && res.status == 503) {
          ++refused;  // draining: refused whole
        } else if (!sent && body.empty() && res.status == -1) {
          ++no_response;  // the connection closed before a status line: the server had stopped listening
        } else if (cut++ == 0) {
          std::lock_guard<std::mutex> lk(first_cut_mu);
          first_cut = "status " + std::to_string(res.status) + ", " + httplib::to_string(error) + ": " +
                      body.substr(body.size() > 300 ? body.size() - 300 : 0);
        }
        break;
      }
      if (!counted && ++started == kClients) std::call_once(once, [&] { all_started.set_value(); });
    });
  ASSERT_EQ(all_started.get_future().wait_for(std::chrono::minutes(5)), std::future_status::ready);
  kill(p.pid, SIGTERM);
  for (auto& t : clients) t.join();
  int wstatus = 0;
  waitpid(p.pid, &wstatus, 0);
  std::printf("[sigterm] %d streams complete, %d cut, %d refused, %d without a response\n", complete.load(),
              cut.load(), refused.load(), no_response.load());
  EXPECT_EQ(cut.load(), 0) << "a started stream ended early; its end: " << first_cut;
  EXPECT_GE(complete.load(), kClients);
  EXPECT_TRUE(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0) << "exit status " << wstatus;
}

// SIGTERM: a streamed request in flight is answered in full, then the server exits 0. (Last: it stops
// the server.) The request is in flight by construction, whatever the machine's speed: the client reads
// its first event, then holds (reads nothing more) until the signal is sent; ignore_eos makes its length
// max_tokens exactly.
TEST_F(Serve, SigtermFinishesInFlightRequestsAndExitsZero) {
  constexpr int64_t kTokens = 60;
  std::promise<void> first_event, signalled;
  auto hold = signalled.get_future().share();
  auto inflight = std::async(std::launch::async, [&] {
    httplib::Client c("127.0.0.1", server_->port);
    c.set_read_timeout(120);
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    req.set_header("Content-Type", "application/json");
    req.body = json({{"model", "lora_a"},
                     {"prompt", "the"},
                     {"max_tokens", kTokens},
                     {"temperature", 0},
                     {"ignore_eos", true},
                     {"stream", true}})
                   .dump();
    std::string body;
    bool told = false;
    req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
      body.append(data, n);
      if (!told && body.find("\n\n") != std::string::npos) {
        told = true;
        first_event.set_value();
        hold.wait();
      }
      return true;
    };
    httplib::Response res;
    httplib::Error error = httplib::Error::Success;
    const bool sent = c.send(req, res, error);
    if (!told) first_event.set_value();  // no event came: let the test fail instead of waiting
    return std::make_tuple(sent, res.status, body);
  });
  ASSERT_EQ(first_event.get_future().wait_for(std::chrono::minutes(2)), std::future_status::ready);
  kill(server_->pid, SIGTERM);
  signalled.set_value();
  const auto [sent, status, body] = inflight.get();
  EXPECT_TRUE(sent);
  EXPECT_EQ(status, 200);
  std::string text, finish;
  for (size_t at = 0; (at = body.find("data: ", at)) != std::string::npos; at += 6) {
    const std::string line = body.substr(at + 6, body.find("\n\n", at) - at - 6);
    if (line == "[DONE]") {
      finish += "+done";
      continue;
    }
    const json e = json::parse(line);
    text += e["choices"][0]["text"].get<std::string>();
    if (!e["choices"][0]["finish_reason"].is_null())
      finish += e["choices"][0]["finish_reason"].get<std::string>();
  }
  EXPECT_EQ(finish, "length+done") << "the stream ends with its final event, then [DONE]";
  EXPECT_EQ(text, library_text("the", {"lora_a"}, kTokens, 0, 0, true))
      << "answered in full, not cut at the signal";
  int wstatus = 0;
  waitpid(server_->pid, &wstatus, 0);
  server_->pid = -1;
  EXPECT_TRUE(WIFEXITED(wstatus) && WEXITSTATUS(wstatus) == 0) << "exit status " << wstatus;
}

}  // namespace
}  // namespace mdl
