// The HTTP API over an Engine (cpp-httplib): OpenAI-compatible completions (streamed as server-sent
// events when asked), chat completions for checkpoints with a ChatML or Llama 3 chat template, models,
// runtime module loading and unloading, classification and embeddings for encoders, health and
// Prometheus metrics. Every refusal is a JSON error {"error": {"message", "type", "param", "code"}}
// with a 4xx status naming the field; a failing request never affects the others.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace mdl {

class Engine;

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;  ///< 0: any free port (see bind())
  int threads = 0;  ///< HTTP worker threads; 0: 2 x max batch + 8, so waiting clients do not starve batching
  int64_t max_body_bytes = 1 << 20;  ///< larger bodies: 413
  int listen_backlog = 1024;         ///< connections the kernel queues until the server accepts them
  std::string model_dir;             ///< for the chat template (tokenizer_config.json)
  /// a chat template file (the Jinja text tokenizer_config.json would hold: ChatML or Llama 3) used instead
  /// of the checkpoint's; empty: the checkpoint's
  std::string chat_template_file;
  int64_t max_batch = 32;  ///< the engine's, to size the thread pool
  /// Runtime module loading and unloading (POST /v1/modules, DELETE /v1/modules/NAME) need
  /// "Authorization: Bearer <admin_token>"; empty: those endpoints are off (403). Serving never needs it.
  std::string admin_token;
};

class Server {
 public:
  Server(Engine& engine, ServerOptions options);
  ~Server();
  /// Binds the listening socket; returns the port (the chosen one when options.port is 0).
  int bind();
  /// Serves until stop(); returns once the requests in flight have finished.
  void listen();
  /// Refuses new requests (503), finishes every queued, running and streamed one, then stops listening;
  /// safe from any thread.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace mdl
