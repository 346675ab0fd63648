#include "mdl/serving/server.h"

#include <ATen/ATen.h>
#include <httplib.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>

#include "mdl/core/error.h"
#include "mdl/core/log.h"
#include "mdl/serving/chat_template.h"
#include "mdl/serving/engine.h"
#include "mdl/serving/request_error.h"
#include "mdl/tokenizers/unicode.h"

namespace mdl {
namespace {

using nlohmann::json;

const char* error_type(int status) {
  switch (status) {
    case 401:
      return "authentication_error";
    case 403:
      return "permission_error";
    case 404:
      return "not_found_error";
    case 409:
      return "conflict_error";
    case 413:
      return "request_too_large";
    case 503:
      return "overloaded_error";
    default:
      return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

// Every body is valid JSON whatever text it carries: bytes that are not UTF-8 (half a character of a
// module name, a file's fragment in a message) become U+FFFD instead of an exception in a handler.
std::string body_text(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

void send_error(httplib::Response& res, int status, const std::string& message,
                const std::string& param = "") {
  res.status = status;
  json e = {{"message", message}, {"type", error_type(status)}, {"code", status}};
  e["param"] = param.empty() ? json(nullptr) : json(param);
  res.set_content(body_text(json({{"error", e}})), "application/json");
}

json parse_body(const httplib::Request& req) {
  json j = json::parse(req.body, nullptr, false);
  if (j.is_discarded()) throw RequestError(400, "", "[serve] the body is not valid JSON");
  if (!j.is_object())
    throw RequestError(400, "",
                       std::string("[serve] the body must be a JSON object, found ") + j.type_name());
  return j;
}

// Typed optional fields: a wrong type is a 400 naming the field, the expected and the found type.
template <class T>
T field(const json& j, const char* name, T fallback) {
  if (!j.contains(name) || j[name].is_null()) return fallback;
  const json& v = j[name];
  bool ok;
  const char* want;
  if constexpr (std::is_same_v<T, bool>)
    ok = v.is_boolean(), want = "a boolean";
  else if constexpr (std::is_integral_v<T>)
    ok = v.is_number_integer(), want = "an integer";
  else if constexpr (std::is_floating_point_v<T>)
    ok = v.is_number(), want = "a number";
  else
    ok = v.is_string(), want = "a string";
  if (!ok)
    throw RequestError(400, name,
                       std::string("[serve] '") + name + "' must be " + want + ", found " + v.type_name());
  return v.get<T>();
}

/// "modules": ["name", "name:0.5", {"name": ..., "scale": ...}]
std::vector<ModuleChoice> module_list(const json& j) {
  std::vector<ModuleChoice> out;
  if (!j.contains("modules") || j["modules"].is_null()) return out;
  const json& m = j["modules"];
  if (!m.is_array())
    throw RequestError(400, "modules",
                       std::string("[serve] 'modules' must be an array, found ") + m.type_name());
  for (size_t i = 0; i < m.size(); ++i) {
    const std::string where = "modules[" + std::to_string(i) + "]";
    ModuleChoice c;
    if (m[i].is_string()) {
      const std::string s = m[i].get<std::string>();
      const size_t colon = s.rfind(':');
      c.name = s.substr(0, colon);
      if (colon != std::string::npos) {
        try {
          size_t used = 0;
          c.scale = std::stod(s.substr(colon + 1), &used);
          if (used != s.size() - colon - 1 || !std::isfinite(c.scale))
            throw std::invalid_argument("trailing");
        } catch (const std::exception&) {
          throw RequestError(
              400, where, "[serve] " + where + " '" + s + "': the scale after ':' must be a finite number");
        }
      }
    } else if (m[i].is_object() && m[i].contains("name") && m[i]["name"].is_string()) {
      c.name = m[i]["name"].get<std::string>();
      c.scale = field<double>(m[i], "scale", 1.0);
      if (!std::isfinite(c.scale))
        throw RequestError(400, where, "[serve] " + where + ": 'scale' must be a finite number");
    } else {
      throw RequestError(400, where,
                         "[serve] " + where + " must be \"name[:scale]\" or {\"name\", \"scale\"}");
    }
    out.push_back(c);
  }
  return out;
}

GenerateOptions sampling(const json& j) {
  GenerateOptions o;
  o.max_tokens = field<int64_t>(j, "max_tokens", 16);
  o.temperature = field<double>(j, "temperature", 1.0);
  o.top_p = field<double>(j, "top_p", 1.0);
  o.top_k = field<int64_t>(j, "top_k", 0);
  o.seed = static_cast<uint64_t>(field<int64_t>(j, "seed", 0));
  o.ignore_eos = field<bool>(j, "ignore_eos", false);
  auto penalty = [&](const char* key) {
    const double v = field<double>(j, key, 0.0);
    if (!(std::abs(v) <= 2))
      throw RequestError(400, key,
                         std::string("[serve] '") + key + "' must be in [-2, 2], got " + std::to_string(v));
    return v;
  };
  o.frequency_penalty = penalty("frequency_penalty");
  o.presence_penalty = penalty("presence_penalty");
  if (o.max_tokens < 1)
    throw RequestError(400, "max_tokens",
                       "[serve] 'max_tokens' must be >= 1, got " + std::to_string(o.max_tokens));
  if (o.temperature < 0 || o.temperature > 100)
    throw RequestError(400, "temperature",
                       "[serve] 'temperature' must be in [0, 100], got " + std::to_string(o.temperature));
  if (!(o.top_p > 0 && o.top_p <= 1))
    throw RequestError(400, "top_p", "[serve] 'top_p' must be in (0, 1], got " + std::to_string(o.top_p));
  if (o.top_k < 0)
    throw RequestError(400, "top_k", "[serve] 'top_k' must be >= 0, got " + std::to_string(o.top_k));
  return o;
}

std::vector<std::string> stop_list(const json& j) {
  std::vector<std::string> out;
  if (!j.contains("stop") || j["stop"].is_null()) return out;
  const json& s = j["stop"];
  if (s.is_string()) return {s.get<std::string>()};
  if (!s.is_array() || s.size() > 4)
    throw RequestError(400, "stop", "[serve] 'stop' must be a string or an array of at most 4 strings");
  for (const auto& x : s) {
    if (!x.is_string()) throw RequestError(400, "stop", "[serve] 'stop' entries must be strings");
    out.push_back(x.get<std::string>());
  }
  return out;
}

std::vector<std::string> inputs(const json& j) {
  if (!j.contains("input"))
    throw RequestError(400, "input", "[serve] missing field 'input' (a string or a list of strings)");
  const json& in = j["input"];
  if (in.is_string()) return {in.get<std::string>()};
  std::vector<std::string> out;
  if (in.is_array())
    for (const auto& x : in) {
      if (!x.is_string()) throw RequestError(400, "input", "[serve] 'input' entries must be strings");
      out.push_back(x.get<std::string>());
    }
  else
    throw RequestError(
        400, "input",
        std::string("[serve] 'input' must be a string or a list of strings, found ") + in.type_name());
  return out;
}

int64_t now_seconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

/// Text chunks from the engine thread to a streaming response.
struct Stream {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::string> chunks;
  std::atomic<bool> gone{false};  // the client disconnected
};

/// Streaming responses not yet over, so that shutdown waits for their last events.
class OpenStreams {
 public:
  /// Held by a stream's content provider: counts the stream open until the provider is destroyed.
  std::shared_ptr<void> open() {
    std::lock_guard<std::mutex> lk(mu_);
    ++n_;
    return std::shared_ptr<void>(nullptr, [this](void*) {
      std::lock_guard<std::mutex> lk(mu_);
      if (--n_ == 0) cv_.notify_all();
    });
  }
  void wait_until_none() {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return n_ == 0; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int64_t n_ = 0;
};

}  // namespace

struct Server::Impl {
  Engine& engine;
  ServerOptions options;
  httplib::Server http;
  ChatFormat chat = ChatFormat::none;
  std::vector<std::string> labels;  // config.json id2label, by id
  std::atomic<int64_t> http_errors{0}, next_id{0};
  OpenStreams streams;
  int listen_socket = -1;                 // httplib's, seen through its socket-options hook
  const int64_t started = now_seconds();  // /v1/models' "created"

  Impl(Engine& e, ServerOptions o) : engine(e), options(std::move(o)) {
    chat = options.model_dir.empty() ? ChatFormat::none : chat_format(options.model_dir);
    if (!options.chat_template_file.empty()) {
      std::ifstream in(options.chat_template_file);
      MDL_CHECK(in.good(), "[serve] cannot read the chat template file '", options.chat_template_file, "'");
      std::stringstream text;
      text << in.rdbuf();
      chat = chat_format_of_template(text.str());
      MDL_CHECK(chat == ChatFormat::chatml || chat == ChatFormat::llama3, "[serve] the chat template file '",
                options.chat_template_file, "' is ",
                chat == ChatFormat::none ? "empty"
                                         : "neither ChatML (<|im_start|>) nor Llama 3 (<|start_header_id|>)",
                "; mdl renders those two formats");
    }
    std::ifstream config(options.model_dir + "/config.json");
    const json c = config ? json::parse(config, nullptr, false) : json();
    if (c.is_object() && c.contains("id2label") && c["id2label"].is_object())
      for (const auto& [k, v] : c["id2label"].items()) {
        const size_t i = static_cast<size_t>(std::strtoul(k.c_str(), nullptr, 10));
        if (i < 4096 && v.is_string()) {
          if (labels.size() <= i) labels.resize(i + 1);
          labels[i] = v.get<std::string>();
        }
      }
    MDL_CHECK(options.max_body_bytes > 0 && options.threads >= 0 && options.port >= 0 &&
                  options.port <= 65535 && options.listen_backlog > 0,
              "[serve] invalid server options: max body ", options.max_body_bytes, " bytes, ",
              options.threads, " threads, port ", options.port, ", backlog ", options.listen_backlog);
    const int threads = options.threads > 0
                            ? options.threads
                            : static_cast<int>(std::min<int64_t>(2 * options.max_batch + 8, 512));
    http.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
    // SO_REUSEADDR (a restart binds the port at once), not httplib's default SO_REUSEPORT, which would let
    // another process bind the same port and take a share of the connections.
    http.set_socket_options([this](socket_t sock) {
      int yes = 1;
      setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
      listen_socket = sock;
    });
    http.set_payload_max_length(static_cast<size_t>(options.max_body_bytes));
    http.set_error_handler([this](const httplib::Request& req, httplib::Response& res) {
      ++http_errors;
      if (!res.body.empty()) return;
      if (res.status == 413 &&
          req.get_header_value("Content-Type").rfind("application/x-www-form-urlencoded", 0) == 0)
        send_error(
            res, 413,
            "[serve] a form-encoded body is limited to 8192 bytes (the HTTP library's limit for forms); "
            "send JSON with 'Content-Type: application/json'");
      else if (res.status == 413)
        send_error(
            res, 413,
            "[serve] the body is over the limit of " + std::to_string(options.max_body_bytes) + " bytes");
      else if (res.status == 404)
        send_error(res, 404, "[serve] no such endpoint; see GET /v1/models, POST /v1/completions");
      else
        send_error(res, res.status, "[serve] request failed with status " + std::to_string(res.status));
    });
    http.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
      try {
        std::rethrow_exception(ep);
      } catch (const RequestError& e) {
        send_error(res, e.status(), e.what(), e.param());
      } catch (const std::exception& e) {
        send_error(res, 400, e.what());  // mdl::Error from validation deeper down: the request was at fault
      } catch (...) {
        send_error(res, 500, "[serve] unknown failure");
      }
    });
    routes();
  }

  std::string id(const char* prefix) {
    return std::string(prefix) + std::to_string(now_seconds()) + "-" + std::to_string(next_id++);
  }

  // Module management is the operator's: off without --admin-token, else the bearer token must match
  // (compared in constant time).
  void check_admin(const httplib::Request& req) const {
    if (options.admin_token.empty())
      throw RequestError(403, "",
                         "[serve] runtime module loading and unloading are off; start mdl serve with "
                         "--admin-token (or MDL_ADMIN_TOKEN) to allow them");
    const std::string auth = req.get_header_value("Authorization");
    const std::string prefix = "Bearer ";
    const std::string given = auth.rfind(prefix, 0) == 0 ? auth.substr(prefix.size()) : std::string();
    unsigned char diff = given.size() == options.admin_token.size() ? 0 : 1;
    for (size_t i = 0; i < given.size(); ++i)
      diff |= static_cast<unsigned char>(given[i] ^ options.admin_token[i % options.admin_token.size()]);
    if (diff != 0)
      throw RequestError(401, "",
                         "[serve] module management needs the header 'Authorization: Bearer <admin token>'" +
                             std::string(auth.empty() ? "" : "; the token given does not match"));
  }

  void routes() {
    http.Get("/health", [](const httplib::Request&, httplib::Response& res) {
      res.set_content(R"({"status":"ok"})", "application/json");
    });
    // As vLLM lists a base and its LoRAs: the base under its checkpoint's name (requests may name it, or
    // "base"), each module with its directory as root and the base as parent.
    http.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      const std::string base = engine.config().base_name();
      json data = json::array({{{"id", base},
                                {"object", "model"},
                                {"created", started},
                                {"owned_by", "mdl"},
                                {"root", options.model_dir.empty() ? base : options.model_dir},
                                {"parent", nullptr},
                                {"max_model_len", engine.config().max_position}}});
      for (const auto& m : engine.modules())
        data.push_back({{"id", m},
                        {"object", "model"},
                        {"created", started},
                        {"owned_by", "mdl"},
                        {"root", engine.module_root(m)},
                        {"parent", base}});
      res.set_content(body_text(json({{"object", "list"}, {"data", data}})), "application/json");
    });
    // vLLM's runtime LoRA endpoints, as aliases of POST /v1/modules and DELETE /v1/modules/NAME (the same
    // admin token guards them, as VLLM_ALLOW_RUNTIME_LORA_UPDATING does vLLM's).
    http.Post("/v1/load_lora_adapter", [this](const httplib::Request& req, httplib::Response& res) {
      check_admin(req);
      const json j = parse_body(req);
      const std::string name = field<std::string>(j, "lora_name", ""),
                        path = field<std::string>(j, "lora_path", "");
      if (name.empty() || path.empty())
        throw RequestError(400, name.empty() ? "lora_name" : "lora_path",
                           "[serve] give 'lora_name' and 'lora_path'");
      engine.load_module(name, path);
      res.set_content("Success: LoRA adapter '" + name + "' added successfully.", "text/plain");
    });
    http.Post("/v1/unload_lora_adapter", [this](const httplib::Request& req, httplib::Response& res) {
      check_admin(req);
      const json j = parse_body(req);
      const std::string name = field<std::string>(j, "lora_name", "");
      if (name.empty()) throw RequestError(400, "lora_name", "[serve] give 'lora_name'");
      engine.unload_module(name);
      res.set_content("Success: LoRA adapter '" + name + "' removed successfully.", "text/plain");
    });
    http.Post("/v1/modules", [this](const httplib::Request& req, httplib::Response& res) {
      check_admin(req);
      const json j = parse_body(req);
      const std::string name = field<std::string>(j, "name", ""), path = field<std::string>(j, "path", "");
      if (name.empty() || path.empty())
        throw RequestError(400, name.empty() ? "name" : "path", "[serve] give 'name' and 'path'");
      engine.load_module(name, path);
      res.status = 201;
      res.set_content(body_text(json({{"id", name}, {"object", "model"}, {"loaded", true}})),
                      "application/json");
    });
    http.Delete(R"(/v1/modules/([^/]+))", [this](const httplib::Request& req, httplib::Response& res) {
      check_admin(req);
      engine.unload_module(req.matches[1]);
      res.set_content(body_text(json({{"id", std::string(req.matches[1])}, {"deleted", true}})),
                      "application/json");
    });
    http.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
      const json j = parse_body(req);
      if (!j.contains("prompt")) throw RequestError(400, "prompt", "[serve] missing field 'prompt'");
      complete(j, prompts(j["prompt"]), res, false);
    });
    http.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
      const json j = parse_body(req);
      if (chat == ChatFormat::none)
        throw RequestError(
            400, "model",
            "[serve] the checkpoint '" + options.model_dir +
                "' has no chat template (no chat_template in its tokenizer_config.json); give one "
                "with mdl serve --chat-template FILE (ChatML or Llama 3) or add chat_template to "
                "tokenizer_config.json, or use /v1/completions with the prompt rendered");
      if (chat == ChatFormat::unsupported)
        throw RequestError(
            400, "model",
            "[serve] the checkpoint's chat template is neither ChatML nor Llama 3, the formats mdl renders");
      if (!j.contains("messages") || !j["messages"].is_array() || j["messages"].empty())
        throw RequestError(400, "messages",
                           "[serve] 'messages' must be a non-empty array of {\"role\", \"content\"}");
      std::vector<std::pair<std::string, std::string>> messages;
      for (size_t i = 0; i < j["messages"].size(); ++i) {
        const json& m = j["messages"][i];
        if (!m.is_object() || !m.contains("role") || !m["role"].is_string() || !m.contains("content") ||
            !m["content"].is_string())
          throw RequestError(
              400, "messages",
              "[serve] messages[" + std::to_string(i) + "] must be {\"role\": str, \"content\": str}");
        messages.emplace_back(m["role"].get<std::string>(), m["content"].get<std::string>());
      }
      complete(j, {engine.tokenizer().encode(render_chat(chat, messages), false)}, res, true);
    });
    http.Post("/v1/classify", [this](const httplib::Request& req, httplib::Response& res) {
      const json j = parse_body(req);
      const auto texts = inputs(j);
      const auto chosen = engine.resolve(requested_module(j), module_list(j));
      at::Tensor logits = engine.classify(texts, chosen);
      // The names the modules were trained with; without any, the base's config.json id2label.
      const std::vector<std::string> trained = engine.labels(chosen);
      const std::vector<std::string>& labels = trained.empty() ? this->labels : trained;
      at::Tensor probs = at::softmax(logits, -1);
      json data = json::array();
      for (int64_t i = 0; i < logits.size(0); ++i) {
        const int64_t k = probs[i].argmax().item<int64_t>();
        std::vector<double> p(static_cast<size_t>(probs.size(1)));
        for (int64_t c = 0; c < probs.size(1); ++c) p[static_cast<size_t>(c)] = probs[i][c].item<double>();
        const std::string label =
            k < static_cast<int64_t>(labels.size()) && !labels[static_cast<size_t>(k)].empty()
                ? labels[static_cast<size_t>(k)]
                : "LABEL_" + std::to_string(k);
        data.push_back({{"index", i}, {"label", label}, {"label_id", k}, {"scores", p}});
      }
      res.set_content(body_text(json({{"object", "list"}, {"data", data}})), "application/json");
    });
    http.Post("/v1/embeddings", [this](const httplib::Request& req, httplib::Response& res) {
      const json j = parse_body(req);
      const auto texts = inputs(j);
      at::Tensor e = engine.embed(texts, engine.resolve(requested_module(j), module_list(j))).contiguous();
      json data = json::array();
      for (int64_t i = 0; i < e.size(0); ++i) {
        const float* row = e[i].data_ptr<float>();
        data.push_back(
            {{"object", "embedding"}, {"index", i}, {"embedding", std::vector<float>(row, row + e.size(1))}});
      }
      res.set_content(body_text(json({{"object", "list"}, {"data", data}, {"model", requested_model(j)}})),
                      "application/json");
    });
    http.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(metrics(), "text/plain; version=0.0.4");
    });
  }

  /// A completion's prompts: a string, token ids, or a list of either (one choice set per prompt).
  std::vector<std::vector<int64_t>> prompts(const json& p) const {
    auto ids = [&](const json& a, const std::string& where) {
      std::vector<int64_t> out;
      for (const auto& t : a) {
        if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= engine.config().vocab_size)
          throw RequestError(400, "prompt",
                             "[serve] " + where + " token ids must be integers in [0, " +
                                 std::to_string(engine.config().vocab_size) + ")");
        out.push_back(t.get<int64_t>());
      }
      return out;
    };
    const std::string shapes =
        "[serve] 'prompt' must be a string, an array of token ids, or a non-empty array of "
        "strings or of token-id arrays";
    if (p.is_string()) return {engine.tokenizer().encode(p.get<std::string>())};
    if (!p.is_array() || p.empty()) throw RequestError(400, "prompt", shapes);
    if (p[0].is_number_integer()) return {ids(p, "'prompt'")};
    std::vector<std::vector<int64_t>> out;
    for (size_t i = 0; i < p.size(); ++i) {
      const std::string where = "prompt[" + std::to_string(i) + "]";
      if (p[i].is_string())
        out.push_back(engine.tokenizer().encode(p[i].get<std::string>()));
      else if (p[i].is_array() && !p[i].empty())
        out.push_back(ids(p[i], where));
      else
        throw RequestError(400, "prompt", shapes + "; " + where + " is neither");
    }
    return out;
  }

  /// How many log-probabilities a request asks for (-1: none). Completions: `logprobs` = the number of
  /// top tokens (0 to 20); chat: `logprobs` true, with `top_logprobs` (0 to 20).
  static int64_t logprobs_wanted(const json& j, bool chat_api) {
    auto set = [&](const char* key) { return j.contains(key) && !j[key].is_null(); };
    if (chat_api) {
      const bool on = field<bool>(j, "logprobs", false);
      const int64_t top = field<int64_t>(j, "top_logprobs", 0);
      if (top < 0 || top > 20)
        throw RequestError(400, "top_logprobs",
                           "[serve] 'top_logprobs' must be 0 to 20, got " + std::to_string(top));
      if (set("top_logprobs") && !on)
        throw RequestError(400, "top_logprobs", "[serve] 'top_logprobs' needs 'logprobs': true");
      return on ? top : -1;
    }
    if (!set("logprobs")) return -1;
    if (j["logprobs"].is_boolean()) return j["logprobs"].get<bool>() ? 0 : -1;  // as chat's flag
    if (!j["logprobs"].is_number_integer() || j["logprobs"].get<int64_t>() < 0 ||
        j["logprobs"].get<int64_t>() > 20)
      throw RequestError(
          400, "logprobs",
          "[serve] 'logprobs' (completions) is the number of top tokens to list, 0 to 20, found " +
              j["logprobs"].dump().substr(0, 40));
    return j["logprobs"].get<int64_t>();
  }

  /// A token's text for logprobs (its bytes may be part of a character: repaired to valid UTF-8).
  std::string piece(int64_t token) const { return unicode::valid_utf8(engine.tokenizer().decode({token})); }

  /// OpenAI's logprobs object of one choice: completions' parallel lists or chat's content entries. A
  /// final end-of-sequence token is not listed (it has no text).
  json logprobs_object(const CompletionResult& out, bool chat_api) const {
    std::vector<TokenLogprob> shown = out.logprobs;
    const auto& eos = engine.config().eos_token_ids;
    if (!shown.empty() && out.finish_reason == "stop" &&
        std::find(eos.begin(), eos.end(), shown.back().token) != eos.end())
      shown.pop_back();
    auto bytes = [](const std::string& t) {
      json b = json::array();
      for (unsigned char c : t) b.push_back(static_cast<int>(c));
      return b;
    };
    if (chat_api) {
      json content = json::array();
      for (const auto& t : shown) {
        json top = json::array();
        for (const auto& [id, lp] : t.top)
          top.push_back({{"token", piece(id)}, {"logprob", lp}, {"bytes", bytes(piece(id))}});
        const std::string text = piece(t.token);
        content.push_back(
            {{"token", text}, {"logprob", t.logprob}, {"bytes", bytes(text)}, {"top_logprobs", top}});
      }
      return {{"content", content}};
    }
    json tokens = json::array(), lps = json::array(), tops = json::array(), offsets = json::array();
    int64_t offset = 0;
    for (const auto& t : shown) {
      const std::string text = piece(t.token);
      tokens.push_back(text), lps.push_back(t.logprob), offsets.push_back(offset);
      offset += static_cast<int64_t>(text.size());
      json top = json::object();
      for (const auto& [id, lp] : t.top)  // most likely first: a text two ids share keeps the larger
        if (!top.contains(piece(id))) top[piece(id)] = lp;
      tops.push_back(top);
    }
    return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offsets}};
  }

  /// The model a request names: `model`, or LoRAX's `adapter_id` (the same thing), "base" without either.
  static std::string requested_model(const json& j) {
    const std::string model = field<std::string>(j, "model", "");
    const std::string adapter = field<std::string>(j, "adapter_id", "");
    if (!adapter.empty() && !model.empty() && adapter != model)
      throw RequestError(
          400, "adapter_id",
          "[serve] 'adapter_id' (" + adapter + ") and 'model' (" + model + ") name different modules");
    const std::string named = !adapter.empty() ? adapter : model;
    return named.empty() ? "base" : named;
  }

  /// requested_model with the base's own name (as /v1/models lists it) read as "base".
  std::string requested_module(const json& j) const {
    const std::string m = requested_model(j);
    return m == engine.config().base_name() ? "base" : m;
  }

  void complete(const json& j, std::vector<std::vector<int64_t>> prompts, httplib::Response& res,
                bool chat_api) {
    const std::string model = requested_model(j);
    const bool stream = field<bool>(j, "stream", false);
    const int64_t n = field<int64_t>(j, "n", 1);
    if (n < 1 || n > 16)
      throw RequestError(400, "n", "[serve] 'n' must be 1 to 16, got " + std::to_string(n));
    CompletionRequest r;
    r.sampling = sampling(j);
    r.sampling.logprobs = logprobs_wanted(j, chat_api);
    r.stop = stop_list(j);
    r.modules = engine.resolve(requested_module(j), module_list(j));
    if (stream && (n > 1 || prompts.size() > 1))
      throw RequestError(400, n > 1 ? "n" : "prompt",
                         "[serve] a stream carries one choice here: with \"stream\": true give n = 1 and one "
                         "prompt (or send the choices as separate requests)");
    if (stream && r.sampling.logprobs >= 0)
      throw RequestError(400, "logprobs",
                         "[serve] logprobs are returned without streaming here; set \"stream\": false");
    const std::string rid = id(chat_api ? "chatcmpl-" : "cmpl-");
    const int64_t created = now_seconds();
    // Captured by value: the streaming provider runs after this function has returned.
    // A chat stream names the role in its first chunk only, as OpenAI's does.
    auto first_chunk = std::make_shared<std::atomic<bool>>(true);
    auto choice = [chat_api, stream, first_chunk](int64_t index, const std::string& text,
                                                  const json& finish) {
      json c = {{"index", index}, {"finish_reason", finish}, {"logprobs", nullptr}};
      if (chat_api && !stream) {
        c["message"] = {{"role", "assistant"}, {"content", text}};
      } else if (chat_api) {
        c["delta"] = first_chunk->exchange(false) ? json({{"role", "assistant"}, {"content", text}})
                                                  : json({{"content", text}});
      } else {
        c["text"] = text;
      }
      return c;
    };
    const std::string object =
        chat_api ? (stream ? "chat.completion.chunk" : "chat.completion") : "text_completion";
    if (!stream) {
      // Choice i * n + k: prompt i's k-th sample, each with its own seed (seed + k), all in one batch.
      std::vector<CompletionRequest> all;
      for (auto& p : prompts)
        for (int64_t k = 0; k < n; ++k) {
          CompletionRequest one = r;
          one.prompt = p;
          one.sampling.seed = r.sampling.seed + static_cast<uint64_t>(k);
          all.push_back(std::move(one));
        }
      auto futures = engine.submit(std::move(all));
      json choices = json::array();
      int64_t prompt_tokens = 0, completion_tokens = 0;
      for (size_t i = 0; i < futures.size(); ++i) {
        CompletionResult out = futures[i].get();
        if (out.finish_reason == "error")
          throw RequestError(500, "", "[serve] generation failed: " + out.error);
        json c = choice(static_cast<int64_t>(i), out.text, out.finish_reason);
        if (r.sampling.logprobs >= 0) c["logprobs"] = logprobs_object(out, chat_api);
        choices.push_back(std::move(c));
        if (i % static_cast<size_t>(n) == 0) prompt_tokens += out.prompt_tokens;  // each prompt once
        completion_tokens += static_cast<int64_t>(out.tokens.size());
      }
      res.set_content(body_text(json({{"id", rid},
                                      {"object", object},
                                      {"created", created},
                                      {"model", model},
                                      {"choices", choices},
                                      {"usage",
                                       {{"prompt_tokens", prompt_tokens},
                                        {"completion_tokens", completion_tokens},
                                        {"total_tokens", prompt_tokens + completion_tokens}}}})),
                      "application/json");
      return;
    }
    r.prompt = std::move(prompts.front());
    auto s = std::make_shared<Stream>();
    r.on_text = [s](const std::string& text) {
      if (s->gone) return false;
      {
        std::lock_guard<std::mutex> lk(s->mu);
        s->chunks.push_back(text);
      }
      s->cv.notify_one();
      return true;
    };
    auto future =
        std::make_shared<std::future<CompletionResult>>(engine.submit(std::move(r)));  // errors: a 4xx here
    auto event = [=](const std::string& text, const json& finish) {
      return "data: " +
             body_text(json({{"id", rid},
                             {"object", object},
                             {"created", created},
                             {"model", model},
                             {"choices", json::array({choice(0, text, finish)})}})) +
             "\n\n";
    };
    res.set_chunked_content_provider(
        "text/event-stream", [s, future, event, open = streams.open()](size_t, httplib::DataSink& sink) {
          try {  // nothing may escape into httplib's thread: it would end the process
            for (;;) {
              std::deque<std::string> ready;
              {
                std::unique_lock<std::mutex> lk(s->mu);
                s->cv.wait_for(lk, std::chrono::milliseconds(20), [&] { return !s->chunks.empty(); });
                ready.swap(s->chunks);
              }
              for (const auto& text : ready) {
                const std::string e = event(text, nullptr);
                if (!sink.write(e.data(), e.size())) {
                  s->gone = true;  // the engine cancels the sequence at its next token
                  return false;
                }
              }
              if (future->wait_for(std::chrono::seconds(0)) != std::future_status::ready) continue;
              std::lock_guard<std::mutex> lk(s->mu);
              if (!s->chunks.empty()) continue;  // text that arrived with the end
              CompletionResult out = future->get();
              std::string tail =
                  out.finish_reason == "error"
                      ? "data: " +
                            body_text(json({{"error", {{"message", out.error}, {"type", "server_error"}}}})) +
                            "\n\n"
                      : event("", out.finish_reason);
              tail += "data: [DONE]\n\n";
              sink.write(tail.data(), tail.size());
              sink.done();
              return true;
            }
          } catch (const std::exception& e) {
            log_error(std::string("[serve] stream failed: ") + e.what());
            s->gone = true;
            return false;
          }
        });
  }

  std::string metrics() {
    const EngineStats s = engine.stats();
    std::string out;
    auto metric = [&](const char* name, const char* type, const char* help, double value) {
      char number[32];
      std::snprintf(number, sizeof(number), "%.10g", value);
      out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n" + name +
             " " + number + "\n";
    };
    metric("mdl_requests_total", "counter", "generation requests accepted", static_cast<double>(s.requests));
    metric("mdl_requests_completed_total", "counter", "generation requests finished",
           static_cast<double>(s.completed));
    metric("mdl_requests_failed_total", "counter", "generation requests failed in the engine",
           static_cast<double>(s.failed));
    metric("mdl_requests_cancelled_total", "counter", "streams whose client went away",
           static_cast<double>(s.cancelled));
    metric("mdl_requests_rejected_total", "counter", "requests refused for a full queue or shutdown",
           static_cast<double>(s.rejected));
    metric("mdl_http_errors_total", "counter", "HTTP responses with status >= 400",
           static_cast<double>(http_errors.load()));
    metric("mdl_prompt_tokens_total", "counter", "prompt tokens prefilled",
           static_cast<double>(s.prompt_tokens));
    metric("mdl_generated_tokens_total", "counter", "tokens generated",
           static_cast<double>(s.generated_tokens));
    metric("mdl_tokens_per_second", "gauge", "generated tokens per second of engine work",
           s.busy_seconds > 0 ? static_cast<double>(s.generated_tokens) / s.busy_seconds : 0.0);
    metric("mdl_decode_steps_total", "counter", "batched decoding steps",
           static_cast<double>(s.decode_steps));
    metric("mdl_batch_size_mean", "gauge", "mean rows per decoding step",
           s.decode_steps ? static_cast<double>(s.decode_rows) / static_cast<double>(s.decode_steps) : 0.0);
    metric("mdl_queue_length", "gauge", "requests waiting", static_cast<double>(s.queue_length));
    metric("mdl_running_sequences", "gauge", "sequences in the running batch",
           static_cast<double>(s.running));
    metric("mdl_module_cache_hits_total", "counter", "module lookups served from memory",
           static_cast<double>(s.cache_hits));
    metric("mdl_module_cache_misses_total", "counter", "module lookups that loaded from disk",
           static_cast<double>(s.cache_misses));
    metric("mdl_module_cache_evictions_total", "counter", "modules evicted for the memory budget",
           static_cast<double>(s.cache_evictions));
    metric("mdl_module_cache_bytes", "gauge", "bytes of module tensors in memory",
           static_cast<double>(s.cache_bytes));
    metric("mdl_modules_loaded", "gauge", "modules in memory", static_cast<double>(s.modules_loaded));
    auto histogram = [&](const char* name, const char* help, const LatencyHistogram& h) {
      out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " histogram\n";
      int64_t cumulative = 0;
      char line[160];
      for (size_t i = 0; i <= LatencyHistogram::bounds().size(); ++i) {
        cumulative += h.counts[i];
        if (i < LatencyHistogram::bounds().size())
          std::snprintf(line, sizeof(line), "%s_bucket{le=\"%g\"} %lld\n", name,
                        LatencyHistogram::bounds()[i], static_cast<long long>(cumulative));
        else
          std::snprintf(line, sizeof(line), "%s_bucket{le=\"+Inf\"} %lld\n", name,
                        static_cast<long long>(cumulative));
        out += line;
      }
      std::snprintf(line, sizeof(line), "%s_sum %.10g\n%s_count %lld\n", name, h.sum, name,
                    static_cast<long long>(h.count));
      out += line;
    };
    histogram("mdl_time_to_first_token_seconds", "from queueing to a request's first token",
              s.time_to_first_token);
    histogram("mdl_time_per_output_token_seconds", "between consecutive tokens of a request",
              s.token_latency);
    histogram("mdl_queue_time_seconds", "from queueing to joining the running batch", s.queue_time);
    auto labelled = [&](const char* name, const char* help, auto value) {
      out += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " counter\n";
      for (const auto& [module, usage] : s.modules) {
        std::string label;  // Prometheus label values escape backslash, quote and newline
        for (char ch : module)
          label += ch == '"' ? "\\\"" : ch == '\\' ? "\\\\" : ch == '\n' ? "\\n" : std::string(1, ch);
        out += std::string(name) + "{module=\"" + label + "\"} " + std::to_string(value(usage)) + "\n";
      }
    };
    labelled("mdl_module_requests_total", "generation requests by module (the first 64 names, then other)",
             [](const ModuleUsage& u) { return u.requests; });
    labelled("mdl_module_generated_tokens_total", "tokens generated by module",
             [](const ModuleUsage& u) { return u.generated_tokens; });
    return out;
  }
};

Server::Server(Engine& engine, ServerOptions options)
    : impl_(std::make_unique<Impl>(engine, std::move(options))) {}
Server::~Server() = default;

int Server::bind() {
  auto& o = impl_->options;
  if (o.port == 0) {
    const int port = impl_->http.bind_to_any_port(o.host);
    MDL_CHECK(port > 0, "[serve] cannot bind ", o.host, " to any port");
    o.port = port;
  } else {
    MDL_CHECK(impl_->http.bind_to_port(o.host, o.port), "[serve] cannot bind ", o.host, ":", o.port,
              " (in use? choose another --port)");
  }
  // httplib 0.11 listens with a backlog of 5: a burst of new connections overflows it and clients get
  // reset connections. listen() again on the bound socket raises it (Linux keeps the socket and its port).
  MDL_CHECK(impl_->listen_socket >= 0 && ::listen(impl_->listen_socket, o.listen_backlog) == 0,
            "[serve] cannot set the listen backlog to ", o.listen_backlog, ": ", std::strerror(errno));
  return o.port;
}

void Server::listen() {
  impl_->http.listen_after_bind();
}

void Server::stop() {
  // httplib's stop() ends a chunked response at its next chunk: finish every request (queued, running,
  // streamed) first. A stream whose client stopped reading ends at the socket's write timeout.
  impl_->engine.drain();
  impl_->streams.wait_until_none();
  impl_->http.stop();
}

}  // namespace mdl
