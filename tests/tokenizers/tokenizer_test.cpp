#include "mdl/tokenizers/tokenizer.h"

#include <nlohmann/json.hpp>

#include "mdl/tokenizers/unicode.h"
#include "test_util.h"

namespace mdl {
namespace {

using json = nlohmann::json;
using Ids = std::vector<int64_t>;

// GPT-2 layout: ids 0..255 are the byte images of bytes 0..255, then merges.
std::string byte_level_fixture() {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[unicode::encode(unicode::bytes_to_unicode()[b])] = b;
  const std::string G = "\xC4\xA0";  // "Ġ", the image of the space byte
  vocab[G + "t"] = 256;
  vocab["he"] = 257;
  vocab[G + "the"] = 258;
  vocab["ll"] = 259;
  json j = {{"version", "1.0"},
            {"added_tokens", {{{"id", 300}, {"content", "<|endoftext|>"}, {"special", true}}}},
            {"normalizer", nullptr},
            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
            {"post_processor", {{"type", "ByteLevel"}}},
            {"decoder", {{"type", "ByteLevel"}}},
            {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", {G + " t", "h e", G + "t he", "l l"}}}}};
  return j.dump();
}

TEST(Tokenizer, ByteLevelBpeAppliesMergesByRank) {
  Tokenizer tok = Tokenizer::from_json(byte_level_fixture());
  // "a" | " the" -> Ġ t h e -> Ġt h e -> Ġt he -> Ġthe | " hello" -> Ġ h e l l o -> Ġ he ll o
  EXPECT_EQ(tok.encode("a the hello"), (Ids{97, 258, 32, 257, 259, 111}));
  EXPECT_EQ(tok.encode("the"), (Ids{116, 257}));
  EXPECT_EQ(tok.encode("a<|endoftext|>the"), (Ids{97, 300, 116, 257}));
  EXPECT_EQ(tok.decode({97, 300, 116, 257}, /*skip_special_tokens=*/false), "a<|endoftext|>the");
  EXPECT_EQ(tok.decode({97, 300, 116, 257}), "athe");
  for (const std::string text : {"a the hello", "Grüße, мир! 🙂 \n\n  tabs\tand   spaces", ""})
    EXPECT_EQ(tok.decode(tok.encode(text)), text);
  EXPECT_EQ(tok.vocab_size(), 301);
  EXPECT_EQ(tok.decode({97, 5000, 98}), "ab");  // ids past the tokenizer (padded model vocabularies) vanish
  EXPECT_EQ(*tok.token_to_id("<|endoftext|>"), 300);
  EXPECT_TRUE(tok.is_special(300));
}

TEST(Tokenizer, Llama3LayoutSplitThenByteLevelWithIgnoreMerges) {
  json j = json::parse(byte_level_fixture());
  const std::string G = "\xC4\xA0";
  j["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"},
         {"pattern",
          {{"Regex",
            R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"}}},
         {"behavior", "Isolated"},
         {"invert", false}},
        {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  j["model"]["ignore_merges"] = true;
  j["model"]["vocab"][G + "hello"] = 260;  // reachable only as a whole word: no merge chain builds it
  Tokenizer tok = Tokenizer::from_json(j.dump());
  EXPECT_EQ(tok.pre_tokenize("I'M 12345"), (std::vector<std::string>{"I", "'M", G, "123", "45"}));
  EXPECT_EQ(tok.encode("a hello the"), (Ids{97, 260, 258}));
  for (const std::string text : {"Numbers 1234567 and\n\n  spaces", "x  y"})
    EXPECT_EQ(tok.decode(tok.encode(text)), text);
}

TEST(Tokenizer, MetaspaceBpeWithByteFallback) {
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}};
  char name[8];
  for (int b = 0; b < 256; ++b) std::snprintf(name, sizeof(name), "<0x%02X>", b), vocab[name] = 3 + b;
  const std::string M = "\xE2\x96\x81";  // "▁"
  vocab[M] = 259, vocab["h"] = 260, vocab["e"] = 261, vocab["l"] = 262, vocab["o"] = 263;
  vocab[M + "h"] = 264, vocab["ll"] = 265, vocab[M + "he"] = 266, vocab[M + "hell"] = 267,
            vocab[M + "hello"] = 268;
  json j = {{"added_tokens",
             {{{"id", 0}, {"content", "<unk>"}, {"special", true}},
              {{"id", 1}, {"content", "<s>"}, {"special", true}},
              {{"id", 2}, {"content", "</s>"}, {"special", true}}}},
            {"normalizer",
             {{"type", "Sequence"},
              {"normalizers",
               {{{"type", "Prepend"}, {"prepend", M}},
                {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", M}}}}}},
            {"pre_tokenizer", nullptr},
            {"post_processor",
             {{"type", "TemplateProcessing"},
              {"single",
               {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
              {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}}},
            {"decoder",
             {{"type", "Sequence"},
              {"decoders",
               {{{"type", "Replace"}, {"pattern", {{"String", M}}}, {"content", " "}},
                {{"type", "ByteFallback"}},
                {{"type", "Fuse"}},
                {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}},
            {"model",
             {{"type", "BPE"},
              {"vocab", vocab},
              {"unk_token", "<unk>"},
              {"byte_fallback", true},
              {"fuse_unk", true},
              {"merges", json::array()}}}};
  // Merges in the newer [left, right] pair form.
  for (auto [a, b] : std::vector<std::pair<std::string, std::string>>{
           {M, "h"}, {"l", "l"}, {M + "h", "e"}, {M + "he", "ll"}, {M + "hell", "o"}})
    j["model"]["merges"].push_back(json::array({a, b}));
  Tokenizer tok = Tokenizer::from_json(j.dump());
  EXPECT_EQ(tok.encode("hello hello w"), (Ids{1, 268, 268, 259, 3 + 0x77}));
  EXPECT_EQ(tok.encode("hello", false), (Ids{268}));
  EXPECT_EQ(tok.encode("é", false), (Ids{259, 3 + 0xC3, 3 + 0xA9}));
  EXPECT_EQ(tok.decode(tok.encode("hello hello w")), "hello hello w");
  EXPECT_EQ(tok.decode(tok.encode("  two  spaces, é and 日本")), "  two  spaces, é and 日本");
  EXPECT_EQ(tok.decode({3 + 0xC3}), "\xEF\xBF\xBD");  // a lone continuation byte decodes to U+FFFD
}

TEST(Tokenizer, WordPieceWithBertNormalizer) {
  json vocab = {{"[PAD]", 0}, {"[UNK]", 1}, {"[CLS]", 2}, {"[SEP]", 3}, {"hello", 4},   {"world", 5},
                {",", 6},     {"!", 7},     {"un", 8},    {"##aff", 9}, {"##able", 10}, {"cafe", 11}};
  json j = {{"added_tokens",
             {{{"id", 0}, {"content", "[PAD]"}, {"special", true}},
              {{"id", 1}, {"content", "[UNK]"}, {"special", true}},
              {{"id", 2}, {"content", "[CLS]"}, {"special", true}},
              {{"id", 3}, {"content", "[SEP]"}, {"special", true}}}},
            {"normalizer", {{"type", "BertNormalizer"}, {"lowercase", true}, {"strip_accents", nullptr}}},
            {"pre_tokenizer", {{"type", "BertPreTokenizer"}}},
            {"post_processor", {{"type", "BertProcessing"}, {"sep", {"[SEP]", 3}}, {"cls", {"[CLS]", 2}}}},
            {"decoder", {{"type", "WordPiece"}, {"prefix", "##"}, {"cleanup", true}}},
            {"model",
             {{"type", "WordPiece"},
              {"vocab", vocab},
              {"unk_token", "[UNK]"},
              {"continuing_subword_prefix", "##"}}}};
  Tokenizer tok = Tokenizer::from_json(j.dump());
  EXPECT_EQ(tok.encode("Hello, UNAFFABLE world!"), (Ids{2, 4, 6, 8, 9, 10, 5, 7, 3}));
  EXPECT_EQ(tok.encode("Café xyz", false), (Ids{11, 1}));
  EXPECT_EQ(tok.decode(tok.encode("Hello, UNAFFABLE world!")), "hello, unaffable world!");
  EXPECT_EQ(tok.pre_tokenize("Hi,there"), (std::vector<std::string>{"hi", ",", "there"}));
}

TEST(Tokenizer, BadFilesAreReportedWithTheirSource) {
  EXPECT_THROW_WITH(Tokenizer::from_json("{", "x/tokenizer.json"), "x/tokenizer.json", "not valid JSON");
  EXPECT_THROW_WITH(Tokenizer::from_json("{}", "t.json"), "t.json", "no object field 'model'");
  EXPECT_THROW_WITH(Tokenizer::from_json(R"({"model":{"type":"Unigram","vocab":[]}})", "t.json"), "Unigram",
                    "t.json");
  EXPECT_THROW_WITH(Tokenizer::from_json(R"({"model":{"type":"BPE","vocab":{"a":0},"merges":[]},
      "pre_tokenizer":{"type":"Fancy"}})",
                                         "t.json"),
                    "pre_tokenizer type 'Fancy'", "t.json");
  EXPECT_THROW_WITH(Tokenizer::from_json(R"({"model":{"type":"BPE","vocab":{"a":0},"merges":["a b"]}})"),
                    "merge #0 'a b'");
  EXPECT_THROW_WITH(Tokenizer::from_file("/nonexistent/tokenizer.json"), "does not exist");
  // Ids out of range: negative ones crashed every command, 2e8 sized the table at 6.4 GB.
  EXPECT_THROW_WITH(
      Tokenizer::from_json(R"({"model":{"type":"BPE","vocab":{"a":0,"b":-5},"merges":[]}})", "t.json"),
      "model.vocab: token 'b' has id -5", "ids are in [0, 2) for 2 entries", "t.json");
  EXPECT_THROW_WITH(
      Tokenizer::from_json(R"({"model":{"type":"BPE","vocab":{"a":0,"b":200000000},"merges":[]}})"),
      "token 'b' has id 200000000");
  EXPECT_THROW_WITH(Tokenizer::from_json(R"({"model":{"type":"BPE","vocab":{"a":0,"b":2},"merges":[]},
      "added_tokens":[{"id":3,"content":"<s>"}]})"),
                    "no token with id 1 and no added token takes it");
  EXPECT_THROW_WITH(Tokenizer::from_json(R"({"model":{"type":"BPE","vocab":{"a":1,"b":1},"merges":[]}})"),
                    "id 1 is taken twice");
  // A hole an added token fills is fine (as in tokenizers whose special tokens are not in model.vocab).
  EXPECT_EQ(Tokenizer::from_json(R"({"model":{"type":"BPE","vocab":{"a":0,"b":2},"merges":[]},
      "added_tokens":[{"id":1,"content":"<s>"}]})")
                .vocab_size(),
            3);
  EXPECT_THROW_WITH(Tokenizer::from_json(R"({"model":{"type":"WordPiece","vocab":{"[UNK]":0,"x":-1}}})"),
                    "has id -1");
  EXPECT_THROW_WITH(Tokenizer::from_json(R"({"model":{"type":"BPE","vocab":{"a":0},"merges":[]},
      "added_tokens":[{"id":-3,"content":"<s>"}]})"),
                    "added_tokens: '<s>' has id -3");
  EXPECT_THROW_WITH(Tokenizer::from_json(R"({"model":{"type":"BPE","vocab":{"a":0},"merges":[]},
      "added_tokens":[{"id":200000000,"content":"<s>"}]})"),
                    "has id 200000000", "a gap of at most 1024");
  Tokenizer no_unk = Tokenizer::from_json(R"({"model":{"type":"BPE","vocab":{"a":0},"merges":[]}})");
  EXPECT_THROW_WITH(no_unk.encode("b"), "'b' is not in the BPE vocabulary");
}

}  // namespace
}  // namespace mdl
