#include "mdl/io/model_config.h"

#include <nlohmann/json.hpp>

#include "test_util.h"

namespace mdl {
namespace {

TEST(ModelConfig, ParsesLlamaFamilyWithDefaults) {
  ModelConfig c =
      parse_model_config(R"({"model_type":"llama","architectures":["LlamaForCausalLM"],"vocab_size":100,
    "hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
    "rope_theta":500000.0,"eos_token_id":[5,6],"my_custom_field":{"x":1}})");
  EXPECT_EQ(c.arch, Arch::llama);
  EXPECT_EQ(c.head, HeadKind::causal_lm);
  EXPECT_EQ(c.n_kv_head, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_DOUBLE_EQ(c.rope_theta, 500000.0);
  EXPECT_DOUBLE_EQ(c.norm_eps, 1e-6);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_FALSE(c.qkv_bias);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int64_t>{5, 6}));
  // Unknown fields survive a round trip.
  auto j = nlohmann::json::parse(model_config_to_json(c));
  EXPECT_EQ(j["my_custom_field"]["x"], 1);
  ModelConfig again = parse_model_config(j.dump());
  EXPECT_EQ(again.n_kv_head, 2);
  EXPECT_EQ(again.eos_token_ids, c.eos_token_ids);
}

TEST(ModelConfig, Qwen2HasQkvBiasAndMistralAWindow) {
  const char* sizes =
      R"("vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2)";
  ModelConfig q = parse_model_config(std::string(R"({"model_type":"qwen2",)") + sizes + "}");
  EXPECT_TRUE(q.qkv_bias);
  EXPECT_FALSE(q.o_bias);
  ModelConfig m =
      parse_model_config(std::string(R"({"model_type":"mistral","sliding_window":4,)") + sizes + "}");
  EXPECT_EQ(m.sliding_window, 4);
}

TEST(ModelConfig, Gpt2AndBert) {
  ModelConfig g =
      parse_model_config(R"({"model_type":"gpt2","vocab_size":50,"n_embd":32,"n_layer":2,"n_head":4})");
  EXPECT_EQ(g.intermediate_size, 128);
  EXPECT_TRUE(g.tie_word_embeddings);
  EXPECT_EQ(g.activation, "gelu_new");
  EXPECT_EQ(g.body_prefix(), "transformer");
  ModelConfig b =
      parse_model_config(R"({"model_type":"bert","architectures":["BertForSequenceClassification"],
    "vocab_size":50,"hidden_size":32,"intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":4,
    "id2label":{"0":"neg","1":"neu","2":"pos"}})");
  EXPECT_EQ(b.head, HeadKind::sequence_classification);
  EXPECT_EQ(b.num_labels, 3);
  EXPECT_EQ(b.type_vocab_size, 2);
  EXPECT_DOUBLE_EQ(b.norm_eps, 1e-12);
}

TEST(ModelConfig, ErrorsNameTheField) {
  EXPECT_THROW_WITH(
      parse_model_config(R"({"model_type":"gpt2","vocab_size":50,"n_layer":2,"n_head":4})", "x/config.json"),
      "x/config.json", "missing required field 'n_embd'");
  EXPECT_THROW_WITH(parse_model_config(R"({"vocab_size":50})"), "missing required field 'model_type'");
  EXPECT_THROW_WITH(parse_model_config(R"({"model_type":"t5"})"), "unknown architecture 't5'");
  EXPECT_THROW_WITH(parse_model_config("{oops"), "not valid JSON");
  EXPECT_THROW_WITH(
      parse_model_config(R"({"model_type":"gpt2","vocab_size":"50","n_embd":32,"n_layer":2,"n_head":4})"),
      "'vocab_size' must be an integer");
  EXPECT_THROW_WITH(
      parse_model_config(R"({"model_type":"gpt2","vocab_size":50,"n_embd":30,"n_layer":2,"n_head":4})"),
      "not divisible");
  EXPECT_THROW_WITH(
      parse_model_config(R"({"model_type":"llama","vocab_size":5,"hidden_size":8,"intermediate_size":8,
    "num_hidden_layers":1,"num_attention_heads":2,"rope_scaling":{"type":"yarn"}})"),
      "rope_scaling");
  EXPECT_THROW_WITH(parse_model_config(R"({"model_type":"gpt2","architectures":["GPT2DoubleHeadsThing"],
    "vocab_size":50,"n_embd":32,"n_layer":2,"n_head":4})"),
                    "GPT2DoubleHeadsThing");
  EXPECT_THROW_WITH(load_model_config("/nonexistent/dir"), "does not exist");
}

}  // namespace
}  // namespace mdl
