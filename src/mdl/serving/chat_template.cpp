#include "mdl/serving/chat_template.h"

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "mdl/core/error.h"

namespace mdl {

ChatFormat chat_format(const std::string& model_dir) {
  const auto path = std::filesystem::path(model_dir) / "tokenizer_config.json";
  std::ifstream in(path);
  if (!in) return ChatFormat::none;
  std::stringstream text;
  text << in.rdbuf();
  const auto j = nlohmann::json::parse(text.str(), nullptr, false);
  if (!j.is_object() || !j.contains("chat_template")) return ChatFormat::none;
  std::string t;
  if (j["chat_template"].is_string()) {
    t = j["chat_template"].get<std::string>();
  } else if (j["chat_template"].is_array()) {  // named templates: the "default" one
    for (const auto& e : j["chat_template"])
      if (e.is_object() && e.value("name", "") == "default") t = e.value("template", "");
  }
  return chat_format_of_template(t);
}

ChatFormat chat_format_of_template(const std::string& t) {
  if (t.find_first_not_of(" \t\r\n") == std::string::npos) return ChatFormat::none;
  if (t.find("<|im_start|>") != std::string::npos) return ChatFormat::chatml;
  if (t.find("<|start_header_id|>") != std::string::npos) return ChatFormat::llama3;
  return ChatFormat::unsupported;
}

std::string render_chat(ChatFormat format, const std::vector<std::pair<std::string, std::string>>& messages) {
  std::string out;
  switch (format) {
    case ChatFormat::chatml:
      for (const auto& [role, content] : messages)
        out += "<|im_start|>" + role + "\n" + content + "<|im_end|>\n";
      return out + "<|im_start|>assistant\n";
    case ChatFormat::llama3:
      out = "<|begin_of_text|>";
      for (const auto& [role, content] : messages)
        out += "<|start_header_id|>" + role + "<|end_header_id|>\n\n" + content + "<|eot_id|>";
      return out + "<|start_header_id|>assistant<|end_header_id|>\n\n";
    case ChatFormat::none:
    case ChatFormat::unsupported:
      break;
  }
  MDL_FAIL("[serve] this checkpoint's chat template cannot be rendered");
}

}  // namespace mdl
