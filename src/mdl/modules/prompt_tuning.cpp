#include "mdl/modules/prompt_tuning.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <nlohmann/json.hpp>

#include "mdl/core/error.h"
#include "mdl/core/fields.h"
#include "mdl/core/forward_context.h"

namespace mdl {

void to_json(nlohmann::json& j, const PromptTuningOptions& o) {
  j = prompt_fields().write(o);
}

const FieldList<PromptTuningOptions>& prompt_fields() {
  static const FieldList<PromptTuningOptions> f =
      FieldList<PromptTuningOptions>("prompt")
          .add("num_virtual_tokens", &PromptTuningOptions::num_virtual_tokens, "prompt length n")
          .add(
              "prompt_tuning_init", [](nlohmann::json& v, const PromptTuningOptions& o) { v = o.init; },
              [](const nlohmann::json& v, PromptTuningOptions& o) {
                std::string init = v.get<std::string>();
                for (auto& ch : init) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
                o.init = init;
              },
              "vocab (copies of random rows of the embedding table) | random (N(0, 0.02)); PEFT's upper case "
              "too")
          .check([](const PromptTuningOptions& o) { validate(o); });
  return f;
}

void validate(const PromptTuningOptions& o) {
  MDL_CHECK(o.num_virtual_tokens > 0, "[prompt] num_virtual_tokens must be > 0, got ", o.num_virtual_tokens);
  MDL_CHECK(o.init == "vocab" || o.init == "random", "[prompt] prompt_tuning_init '", o.init,
            "' is not supported; expected vocab or random (TEXT needs a tokenizer: give the token ids' rows "
            "instead)");
}

void from_json(const nlohmann::json& j, PromptTuningOptions& o) {
  o = prompt_fields().read(j);
}

PromptTuningImpl::PromptTuningImpl(const SiteInfo& site, const PromptTuningOptions& o,
                                   const at::Tensor& embeddings, uint64_t seed) {
  MDL_CHECK(site.kind == SiteKind::embedding, "[prompt] '", site.name, "' is not an embedding site");
  auto gen = at::detail::createCPUGenerator(seed);
  const int64_t n = o.num_virtual_tokens, C = site.out_features;
  at::Tensor init;
  if (o.init == "vocab") {
    at::Tensor rows = at::randint(0, embeddings.size(0), {n}, gen, at::kLong);
    init = embeddings.detach().to(at::kCPU).index_select(0, rows).clone();
  } else {
    init = at::empty({n, C}).normal_(0.0, 0.02, gen);
  }
  prompt_embeddings = register_parameter("prompt_embeddings", init.to(embeddings.options()));
}

at::Tensor PromptTuningImpl::forward(const at::Tensor& input, const at::Tensor& current) {
  if (ForwardContext::current().past > 0) return current;  // already in the KV cache
  const int64_t B = current.size(0);
  at::Tensor prompt = prompt_embeddings.unsqueeze(0).expand({B, -1, -1});  // (B, n, C)
  // Several prompts concatenate in attachment order: this one goes after those already prepended.
  const int64_t earlier = current.size(1) - input.size(1);
  if (earlier == 0) return at::cat({prompt, current}, 1);
  return at::cat({current.narrow(1, 0, earlier), prompt, current.narrow(1, earlier, input.size(1))}, 1);
}

}  // namespace mdl
