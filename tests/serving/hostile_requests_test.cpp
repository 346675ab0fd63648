// Requests a careless or hostile client sends, against a running `mdl serve` on loopback: after each one
// the server is alive and answers /health and a completion. Streams never carry invalid UTF-8 (every
// chunk is valid JSON), error bodies are valid JSON whatever bytes the request had, compositions nest
// only so deep, module management needs the admin token and stays inside the served directories, and
// the modules directory may hold anything (loops, FIFOs, devices) without taking listing or serving down.
// Last, a few hundred random and mutated requests, bounded in count.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <sys/stat.h>
#include <torch/utils.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "mdl/backbones/init_model.h"
#include "mdl/modules/module_set.h"
#include "mdl/serving/engine.h"
#include "mdl/tokenizers/tokenizer.h"
#include "mdl/tokenizers/unicode.h"
#include "serving/serve_util.h"
#include "test_util.h"

namespace mdl {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using test::post;
using test::Process;

const httplib::Headers kAdmin = {{"Authorization", "Bearer s3cret"}};

bool valid_utf8(const std::string& s) {
  return unicode::valid_utf8(s) == s;
}

/// A tiny checkpoint whose tokenizer is trained on text full of multi-byte characters (so that tokens
/// are pieces of characters or whole ones), or on the built-in sample.
std::string checkpoint(const test::TempDir& dir, const std::string& arch, bool multibyte) {
  const std::string out = dir / (arch + (multibyte ? "-utf8" : ""));
  if (fs::exists(out + "/config.json")) return out;
  InitModelOptions o;
  o.arch = arch;
  o.seed = 5;
  if (multibyte) {
    std::string text;
    for (int i = 0; i < 40; ++i)
      text +=
          "Grüße aus Köln, schönes Wetter! Ça coûte 5 € — naïve café. Привет мир. 日本語のテキスト。 "
          "🙂🚀 ";
    test::write_file(dir / "corpus.txt", text);
    o.corpus_files = {dir / "corpus.txt"};
  }
  init_model(o, out);
  return out;
}

// The engine streams pieces that are each valid UTF-8 and add up to the final text: byte-level BPE
// (GPT-2: a character split over tokens), byte fallback (Llama: "<0xC3><0xA4>" is ä, "<0x41><0xC3>" two
// U+FFFD), whole multi-byte tokens, and stop strings that hold back bytes inside a character.
TEST(HostileStreams, EveryChunkIsValidUtf8AndTheChunksAddUpToTheText) {
  test::TempDir dir;
  for (const std::string arch : {"gpt2", "llama"})
    for (const bool multibyte : {false, true}) {
      const std::string model = checkpoint(dir, arch, multibyte);
      EngineOptions o;
      o.model_dir = model;
      Engine engine(load_model(model), Tokenizer::from_file(model), o);
      int64_t chunks_checked = 0;
      for (const std::vector<std::string>& stop : {std::vector<std::string>{}, {"qqqzzz"}, {"ä€"}, {"ö"}})
        for (uint64_t seed = 0; seed < 4; ++seed) {
          CompletionRequest r;
          r.prompt = engine.tokenizer().encode("Grüße ");
          r.sampling.max_tokens = 40;
          r.sampling.temperature = 1.5;
          r.sampling.seed = seed;
          r.sampling.ignore_eos = true;
          r.stop = stop;
          std::vector<std::string> chunks;
          r.on_text = [&](const std::string& t) {
            chunks.push_back(t);
            return true;
          };
          const CompletionResult out = engine.submit(std::move(r)).get();
          SCOPED_TRACE(arch + (multibyte ? " utf8" : "") + " seed " + std::to_string(seed) + " stop " +
                       (stop.empty() ? "-" : stop[0]));
          std::string joined;
          for (const auto& c : chunks) {
            EXPECT_TRUE(valid_utf8(c)) << "a chunk that is not valid UTF-8: " << testing::PrintToString(c);
            joined += c;
          }
          EXPECT_TRUE(valid_utf8(out.text));
          EXPECT_EQ(joined, out.text);
          chunks_checked += static_cast<int64_t>(chunks.size());
        }
      EXPECT_GT(chunks_checked, 20) << arch;
    }
}

// Stop strings a tokenizer takes apart, and its id ranges: the stable prefix never ends inside a
// character, and byte-fallback runs wait for the token after them.
TEST(HostileStreams, StableLengthHoldsBackByteRunsAndPartialCharacters) {
  test::TempDir dir;
  const Tokenizer tok = Tokenizer::from_file(checkpoint(dir, "llama", false));
  const auto byte = [&](int b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    const auto id = tok.token_to_id(name);
    EXPECT_TRUE(id.has_value()) << name;
    return id.value_or(0);
  };
  const int64_t a = byte('A'), c3 = byte(0xC3), a4 = byte(0xA4);
  std::vector<int64_t> ids = {a};
  EXPECT_EQ(tok.decode(ids), "A");
  EXPECT_EQ(tok.stable_length(ids, tok.decode(ids)), 0u) << "a byte token may still join the next one";
  ids.push_back(c3);
  EXPECT_EQ(tok.decode(ids), "\xEF\xBF\xBD\xEF\xBF\xBD");  // "<0x41><0xC3>": two U+FFFD, as HF decodes it
  EXPECT_EQ(tok.stable_length(ids, tok.decode(ids)), 0u);
  ids.back() = c3;
  ids = {c3, a4};
  EXPECT_EQ(tok.decode(ids), "ä");
  EXPECT_EQ(tok.stable_length(ids, tok.decode(ids)), 0u);
  const auto word = tok.encode("the", false);
  ids.insert(ids.end(), word.begin(), word.end());
  const std::string text = tok.decode(ids);
  EXPECT_EQ(tok.stable_length(ids, text), text.size()) << "a non-byte token ends the run";
  EXPECT_EQ(unicode::char_boundary("aä", 2), 1u);
  EXPECT_EQ(unicode::char_boundary("aä", 3), 3u);
  EXPECT_EQ(unicode::valid_utf8("a\xC3"), "a\xEF\xBF\xBD");
}

class Hostile : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new test::TempDir();
    model_ = checkpoint(*dir_, "llama", false);
    // A ChatML template, so that chat streams too.
    json tc = json::parse(test::read_file(model_ + "/tokenizer_config.json"));
    tc["chat_template"] =
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}";
    test::write_file(model_ + "/tokenizer_config.json", tc.dump());
    modules_ = *dir_ / "modules";
    fs::create_directories(modules_);
    ModuleSet set(load_model(model_));
    uint64_t seed = 0;
    for (const std::string name :
         {"lora_a", "modül", "my module", "日本"}) {  // names in any script, with spaces
      ModuleConfig c;
      c.lora.init = "random";
      c.seed = ++seed;
      set.add(name, c);
      set.save(name, modules_ + "/" + name);
    }
    // What a modules directory may hold besides modules: a symlink loop, a FIFO and a device as
    // module.json, a module.json that is not JSON.
    fs::create_symlink("loop", modules_ + "/loop");
    fs::create_directories(modules_ + "/fifo");
    mkfifo((modules_ + "/fifo/module.json").c_str(), 0600);
    fs::create_directories(modules_ + "/zero");
    fs::create_symlink("/dev/zero", modules_ + "/zero/module.json");
    fs::create_directories(modules_ + "/garbage");
    test::write_file(modules_ + "/garbage/module.json", "{\"format\": SECRET-CONTENT");
    // Outside the modules directory: a valid module the server must not load unless allowed.
    set.save("lora_a", *dir_ / "outside/lora_a");
    server_ = new Process(
        test::start_server(model_, modules_, *dir_ / "port", {"--admin-token", "s3cret"}, *dir_ / "stderr"));
    ASSERT_GT(server_->port, 0);
  }
  static void TearDownTestSuite() {
    test::kill_server(*server_);
    delete server_;
    delete dir_;
  }
  void TearDown() override { EXPECT_TRUE(test::serving(*server_)) << "the server stopped serving"; }

  static json request(const std::string& path, const std::string& body, int* status,
                      const httplib::Headers& headers = {}) {
    return post(server_->port, path, body, status, headers);
  }
  /// A completion's text through `model`; its status in `status`.
  static json complete(const std::string& model, int* status) {
    return request("/v1/completions", json({{"model", model}, {"prompt", "the"}, {"max_tokens", 4}}).dump(),
                   status);
  }

  static test::TempDir* dir_;
  static std::string model_, modules_;
  static Process* server_;
};
test::TempDir* Hostile::dir_ = nullptr;
std::string Hostile::model_, Hostile::modules_;
Process* Hostile::server_ = nullptr;

// The probe's first crash: a streamed chunk ending inside a character (GPT-2 with a stop string, Llama's
// byte fallback). Every event is JSON, the stream ends with [DONE].
TEST_F(Hostile, StreamsOfEveryTokenizerAreValidJson) {
  test::TempDir d;
  const std::string gpt2 = checkpoint(d, "gpt2", true);
  Process other = test::start_server(gpt2, modules_, d / "port");
  for (const Process* p : {&other, server_})
    for (int seed = 0; seed < 6; ++seed) {
      httplib::Client c("127.0.0.1", p->port);
      c.set_read_timeout(120);
      const bool chat = p == server_ && seed >= 4;  // the Llama server has a chat template
      json body = {{"max_tokens", 60},
                   {"stream", true},
                   {"seed", seed},
                   {"temperature", 1.5},
                   {"stop", seed % 2 ? json::array({"qqqzzz"}) : json::array()}};
      if (chat)
        body["messages"] = {{{"role", "user"}, {"content", "hällo"}}};
      else
        body["prompt"] = "hello";
      if (p == &other && seed >= 4) continue;
      auto r = c.Post(chat ? "/v1/chat/completions" : "/v1/completions", body.dump(), "application/json");
      ASSERT_TRUE(r) << "no response";
      ASSERT_EQ(r->status, 200);
      size_t events = 0;
      for (size_t at = 0; (at = r->body.find("data: ", at)) != std::string::npos; at += 6) {
        const std::string line = r->body.substr(at + 6, r->body.find("\n\n", at) - at - 6);
        if (line == "[DONE]") continue;
        const json e = json::parse(line, nullptr, false);
        EXPECT_FALSE(e.is_discarded()) << "an event that is not JSON: " << testing::PrintToString(line);
        ++events;
      }
      EXPECT_GE(events, 1u);
      EXPECT_NE(r->body.find("data: [DONE]\n\n"), std::string::npos);
    }
  EXPECT_TRUE(test::serving(other));
  test::kill_server(other);
}

// The probe's second crash: a model name with half a character in the error message.
TEST_F(Hostile, NonAsciiAndInvalidUtf8NamesGetJsonErrors) {
  for (const std::string path : {"/v1/completions", "/v1/chat/completions", "/v1/embeddings"})
    for (const std::string model : {"ü", "\xC3", "a\xFF\xFE", "日本語"}) {
      json body = {{"prompt", "hi"}, {"input", "hi"}, {"messages", {{{"role", "user"}, {"content", "hi"}}}}};
      const std::string text = body.dump().substr(0, body.dump().size() - 1) + ",\"model\":\"" + model +
                               "\"}";  // raw bytes, even invalid
      int status = 0;
      const json r = request(path, text, &status);
      ASSERT_TRUE(r.is_object()) << path << " " << testing::PrintToString(model) << ": not a JSON body";
      EXPECT_GE(status, 400) << path;
      EXPECT_LT(status, 500) << path;
      ASSERT_TRUE(r.contains("error")) << r.dump();
      ASSERT_TRUE(test::serving(*server_))
          << "after " << path << " with model " << testing::PrintToString(model);
    }
}

// Module names in any script, and with spaces when quoted, work in requests and compositions.
TEST_F(Hostile, ModuleNamesInAnyScriptAndQuotedWithSpaces) {
  int status = 0;
  json base = complete("base", &status);
  ASSERT_EQ(status, 200);
  for (const std::string model : {"modül", "日本", "\"my module\"", "'my module':0.5",
                                  "stack(modül, \"my module\")", "modül:0.5 + 日本:0.5"}) {
    const json r = complete(model, &status);
    EXPECT_EQ(status, 200) << model << " -> " << r.dump();
  }
  const json unquoted = complete("my module", &status);
  EXPECT_EQ(status, 400) << "a space ends a name unless it is quoted: " << unquoted.dump();
  const json models = json::parse(httplib::Client("127.0.0.1", server_->port).Get("/v1/models")->body);
  std::vector<std::string> ids;
  for (const auto& m : models["data"]) ids.push_back(m["id"]);
  const auto listed = [&](const std::string& id) {
    return std::find(ids.begin(), ids.end(), id) != ids.end();
  };
  for (const std::string want : {"modül", "my module", "日本", "lora_a"})
    EXPECT_TRUE(listed(want)) << want << " is not listed in " << models.dump();
  for (const std::string junk : {"loop", "fifo", "zero"})
    EXPECT_FALSE(listed(junk)) << junk << " is listed as a module";
  EXPECT_TRUE(listed("garbage")) << "a module.json that is not JSON is listed; loading it says why it fails";
  int status_garbage = 0;
  const json g = complete("garbage", &status_garbage);
  EXPECT_EQ(status_garbage, 400) << g.dump();
}

// The probe's third crash: 10,000 nested calls. The depth is limited, and the limit is named.
TEST_F(Hostile, DeepNestingIsRefusedWithTheLimit) {
  for (const std::string f : {"stack(", "avg(", "ties("}) {
    std::string model;
    for (int i = 0; i < 10000; ++i) model += f;
    model += "lora_a";
    for (int i = 0; i < 10000; ++i) model += ")";
    int status = 0;
    const json r = complete(model, &status);
    EXPECT_EQ(status, 400) << f;
    EXPECT_NE(r["error"]["message"].get<std::string>().find("nest at most 32 levels"), std::string::npos)
        << r.dump().substr(0, 300);
    ASSERT_TRUE(test::serving(*server_)) << "after 10,000 nested " << f;
  }
  std::string ok = "lora_a";
  for (int i = 0; i < 30; ++i) ok = "stack(" + ok + ")";
  int status = 0;
  complete(ok, &status);
  EXPECT_EQ(status, 200) << "30 levels are fine";
}

TEST_F(Hostile, ScalesMustBeFinite) {
  for (const std::string model :
       {"lora_a:1e999", "lora_a:nan", "lora_a:inf", "avg(lora_a:1e308, lora_a:1e308)"}) {
    int status = 0;
    const json r = complete(model, &status);
    EXPECT_EQ(status, 400) << model << " -> " << r.dump();
  }
  for (const json& modules :
       {json::array({"lora_a:nan"}), json::array({"lora_a:inf"}),
        json::array({{{"name", "lora_a"}, {"scale", 1e308}}, {{"name", "lora_a"}, {"scale", 1e308}}})}) {
    int status = 0;
    const json r = request("/v1/completions", json({{"prompt", "a"}, {"modules", modules}}).dump(), &status);
    EXPECT_EQ(status, modules[0].is_object() ? 200 : 400) << modules.dump() << " -> " << r.dump();
  }
}

// The probe's fourth finding: POST /v1/modules loaded anything from anywhere, without authentication,
// blocking every completion on a FIFO.
TEST_F(Hostile, ModuleManagementNeedsTheTokenAndStaysInsideTheModulesDirectory) {
  const std::string inside = modules_ + "/lora_a";
  int status = 0;
  json r = request("/v1/modules", json({{"name", "x1"}, {"path", inside}}).dump(), &status);
  EXPECT_EQ(status, 401) << r.dump();
  r = request("/v1/modules", json({{"name", "x1"}, {"path", inside}}).dump(), &status,
              {{"Authorization", "Bearer wrong"}});
  EXPECT_EQ(status, 401) << r.dump();
  auto del = httplib::Client("127.0.0.1", server_->port).Delete("/v1/modules/lora_a");
  ASSERT_TRUE(del);
  EXPECT_EQ(del->status, 401);

  struct Case {
    std::string name, path;
    int status;
    std::string message;
  };
  const std::vector<Case> cases = {
      {"x2", *dir_ / "outside/lora_a", 403, "outside the directories"},
      {"x3", modules_ + "/../outside/lora_a", 403, "outside the directories"},
      {"x4", "../outside/lora_a", 403, "outside the directories"},
      {"x5", "/etc", 403, "outside the directories"},
      {"base", inside, 409, "'base' names the base model"},
      {"modül", inside, 409, "a module named 'modül' is already"},
      {"日本", inside, 409, "a module named '日本' is already"},
      {"../evil", inside, 400, "invalid module name"},
      {"ev/il", inside, 400, "it has a '/'"},
      {"x6", modules_ + "/fifo", 400, "not a module directory"},
      {"x7", modules_ + "/zero", 400, "not a module directory"},
      {"x8", modules_ + "/garbage", 400, "not valid JSON: line 1, column 12"},
      {"x9", modules_ + "/loop", 400, "cannot load"},
      {"x10", modules_ + "/nothing", 400, "cannot load"},
  };
  for (const auto& c : cases) {
    r = request("/v1/modules", json({{"name", c.name}, {"path", c.path}}).dump(), &status, kAdmin);
    EXPECT_EQ(status, c.status) << c.name << " " << c.path << " -> " << r.dump();
    const std::string m = r.value("error", json::object()).value("message", std::string());
    EXPECT_NE(m.find(c.message), std::string::npos) << c.path << " -> " << m;
    EXPECT_EQ(m.find("SECRET"), std::string::npos) << "the file's content echoed: " << m;
    ASSERT_TRUE(test::serving(*server_)) << "after loading " << c.path;
  }
  r = request("/v1/modules", json({{"name", "x11"}, {"path", inside}}).dump(), &status, kAdmin);
  EXPECT_EQ(status, 201) << r.dump();
  r = request("/v1/modules", json({{"name", "x11"}, {"path", inside}}).dump(), &status, kAdmin);
  EXPECT_EQ(status, 409) << r.dump();
  del = httplib::Client("127.0.0.1", server_->port).Delete("/v1/modules/x11", kAdmin);
  ASSERT_TRUE(del);
  EXPECT_EQ(del->status, 200);
}

TEST(HostileServe, ModuleManagementIsOffWithoutAnAdminToken) {
  test::TempDir d;
  const std::string model = checkpoint(d, "llama", false);
  fs::create_directories(d / "modules");
  Process p = test::start_server(model, d / "modules", d / "port");
  int status = 0;
  const json r = post(p.port, "/v1/modules", json({{"name", "a"}, {"path", d / "modules"}}), &status, kAdmin);
  EXPECT_EQ(status, 403) << r.dump();
  EXPECT_NE(r["error"]["message"].get<std::string>().find("--admin-token"), std::string::npos) << r.dump();
  EXPECT_TRUE(test::serving(p));
  test::kill_server(p);
}

TEST(HostileServe, AllowModulePathOpensOneMoreDirectory) {
  test::TempDir d;
  const std::string model = checkpoint(d, "llama", false);
  fs::create_directories(d / "modules");
  ModuleSet set(load_model(model));
  set.add("m", ModuleConfig());
  set.save("m", d / "shared/m");
  Process p = test::start_server(model, d / "modules", d / "port",
                                 {"--admin-token", "s3cret", "--allow-module-path", d / "shared"});
  int status = 0;
  json r = post(p.port, "/v1/modules", json({{"name", "m"}, {"path", d / "shared/m"}}), &status, kAdmin);
  EXPECT_EQ(status, 201) << r.dump();
  r = post(p.port, "/v1/completions", json({{"model", "m"}, {"prompt", "a"}, {"max_tokens", 2}}), &status);
  EXPECT_EQ(status, 200) << r.dump();
  test::kill_server(p);
}

// Forms are refused by the HTTP library past 8 KB: the 413 says so, not the JSON limit.
TEST_F(Hostile, OversizedFormBodiesNameTheirOwnLimit) {
  int status = 0;
  const json r = post(server_->port, "/v1/completions", std::string(9000, 'a'), &status, {},
                      "application/x-www-form-urlencoded");
  EXPECT_EQ(status, 413);
  EXPECT_NE(r["error"]["message"].get<std::string>().find("8192 bytes"), std::string::npos) << r.dump();
}

// A few hundred random and mutated requests: invalid UTF-8, deep nesting, huge numbers, wrong types,
// truncated JSON. Bounded in count ($MDL_FUZZ_SCALE times 300 by hand); each gets an answer (no crash, no
// hang) and the server keeps serving.
TEST_F(Hostile, FuzzedRequestsNeverTakeTheServerDown) {
  std::mt19937_64 rng(20261202);
  const std::vector<json> seeds = {
      {{"prompt", "the cat"}, {"max_tokens", 3}},
      {{"prompt", {1, 2, 3}}, {"max_tokens", 2}, {"model", "lora_a"}, {"stream", true}},
      {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"max_tokens", 2}},
      {{"input", {"a", "b"}}, {"model", "lora_a"}},
      {{"prompt", "x"}, {"modules", {"lora_a:0.5", "modül"}}, {"max_tokens", 2}, {"stop", {"a"}}},
  };
  const std::vector<std::string> paths = {"/v1/completions", "/v1/chat/completions", "/v1/embeddings",
                                          "/v1/classify", "/v1/modules"};
  const std::vector<json> odd = {nullptr,
                                 true,
                                 -1,
                                 0,
                                 1e308,
                                 -1e308,
                                 9223372036854775807LL,
                                 "",
                                 "\xC3\xA4",
                                 "\xEF\xBF\xBD",
                                 std::string(3000, 'z'),
                                 json::array(),
                                 json::object(),
                                 json::array({nullptr, 1})};
  auto pick = [&](size_t n) { return static_cast<size_t>(rng() % n); };
  int answered = 0;
  const char* scale = std::getenv("MDL_FUZZ_SCALE");  // a longer run by hand: MDL_FUZZ_SCALE=50
  const int kRequests = 300 * (scale ? std::max(1, std::atoi(scale)) : 1);
  for (int i = 0; i < kRequests; ++i) {
    json j = seeds[pick(seeds.size())];
    const int edits = 1 + static_cast<int>(pick(3));
    for (int e = 0; e < edits; ++e) {
      static const std::vector<std::string> keys = {
          "prompt", "max_tokens", "model",    "modules", "temperature", "top_p", "top_k", "seed",
          "stop",   "stream",     "messages", "input",   "ignore_eos",  "name",  "path"};
      const std::string key = keys[pick(keys.size())];
      if (key == "model" && pick(2)) {
        std::string m;
        const int depth = static_cast<int>(pick(80));
        for (int k = 0; k < depth; ++k) m += pick(2) ? "stack(" : "avg(";
        m += pick(2) ? "lora_a" : "\xEF\xBF\xBD";  // U+FFFD, turned into invalid bytes below
        for (int k = 0; k < depth; ++k) m += ")";
        j[key] = m;
      } else {
        j[key] = odd[pick(odd.size())];
      }
    }
    std::string body = j.dump(-1, ' ', false, json::error_handler_t::replace);
    for (size_t at; (at = body.find("\xEF\xBF\xBD")) != std::string::npos;) body.replace(at, 3, "\xFF\xFE");
    switch (pick(4)) {  // byte-level mutations on top
      case 0:
        body.resize(pick(body.size() + 1));
        break;
      case 1:
        body[pick(body.size())] = static_cast<char>(rng() & 0xFF);
        break;
      case 2:
        body.insert(pick(body.size()), std::string(1 + pick(4), static_cast<char>(0x80 | (rng() & 0x3F))));
        break;
      default:
        break;
    }
    httplib::Client c("127.0.0.1", server_->port);
    c.set_read_timeout(120);
    const std::string path = paths[pick(paths.size())];
    auto r =
        c.Post(path.c_str(), path == "/v1/modules" ? kAdmin : httplib::Headers{}, body, "application/json");
    ASSERT_TRUE(r) << "no answer to request " << i << " on " << path << ": "
                   << testing::PrintToString(body.substr(0, 200));
    ++answered;
    if (r->get_header_value("Content-Type").find("application/json") != std::string::npos) {
      EXPECT_FALSE(json::parse(r->body, nullptr, false).is_discarded()) << "an answer that is not JSON";
    }
    EXPECT_NE(r->status, 500) << "a request made the server fail: " << r->body.substr(0, 300);
    if (i % 50 == 0) {
      ASSERT_TRUE(test::serving(*server_)) << "after request " << i;
    }
  }
  EXPECT_EQ(answered, kRequests);
}

}  // namespace
}  // namespace mdl
