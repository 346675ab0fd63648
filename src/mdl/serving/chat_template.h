// Chat prompts from messages, for checkpoints whose tokenizer_config.json carries a chat template.
// Hugging Face templates are Jinja programs and Debian has no C++ Jinja engine, so mdl recognises the
// two formats most chat checkpoints use and renders them itself: ChatML (<|im_start|>role ... <|im_end|>:
// Qwen, many fine-tunes) and Llama 3 (<|start_header_id|>role<|end_header_id|> ... <|eot_id|>). Any
// other template is refused with that explanation rather than rendered wrongly.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace mdl {

enum class ChatFormat { none, chatml, llama3, unsupported };

/// The format of `<model_dir>/tokenizer_config.json`'s chat_template (none: no template).
ChatFormat chat_format(const std::string& model_dir);
/// The format of a template's text (a Jinja program as tokenizer_config.json holds; empty: none).
ChatFormat chat_format_of_template(const std::string& text);

/// The prompt text for (role, content) messages, ending where the assistant's answer begins.
std::string render_chat(ChatFormat format, const std::vector<std::pair<std::string, std::string>>& messages);

}  // namespace mdl
