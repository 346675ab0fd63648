#include "mdl/tokenizers/trainer.h"

#include "mdl/backbones/init_model.h"
#include "mdl/tokenizers/tokenizer.h"
#include "test_util.h"

namespace mdl {
namespace {

std::vector<std::string> corpus() {
  auto texts = builtin_corpus();
  for (int i = 0; i < 20; ++i) texts.push_back("the cat and the dog and the bird sat together");
  return texts;
}

class Trained : public ::testing::TestWithParam<TokenizerKind> {};

TEST_P(Trained, RoundTripsAndLearnsFrequentWords) {
  TrainerOptions options;
  options.kind = GetParam();
  options.vocab_size = 420;
  const std::string text = train_tokenizer(corpus(), options);
  EXPECT_EQ(text, train_tokenizer(corpus(), options)) << "training must be deterministic";
  Tokenizer tok = Tokenizer::from_json(text);
  EXPECT_LE(tok.vocab_size(), options.vocab_size + 1);
  EXPECT_LE(tok.encode(" the", false).size(), 2u);
  EXPECT_LE(tok.encode("together", false).size(), 2u);
  const std::string sample = "The dog sat, and then 3 birds flew away!";
  if (GetParam() == TokenizerKind::wordpiece) {
    EXPECT_EQ(tok.decode(tok.encode(sample)), "the dog sat, and then 3 birds flew away!");
    EXPECT_EQ(tok.encode(sample).front(), *tok.token_to_id("[CLS]"));
  } else {
    for (const std::string& s : {sample, std::string("Unseen: Ωμέγα, 漢字, 🙂 and  double  spaces")})
      EXPECT_EQ(tok.decode(tok.encode(s)), s);
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, Trained,
                         ::testing::Values(TokenizerKind::byte_level_bpe, TokenizerKind::metaspace_bpe,
                                           TokenizerKind::wordpiece));

}  // namespace
}  // namespace mdl
