// JSONL datasets of every kind, bad records reported with file and line (or skipped and counted), IDX
// files read through gzip, and multi-task sampling probabilities.
#include "mdl/training/dataset.h"

#include <ATen/ATen.h>
#include <zlib.h>

#include <cmath>

#include "backbones/fixtures.h"
#include "mdl/tokenizers/tokenizer.h"

namespace mdl {
namespace {

const Tokenizer& tokenizer() {
  static Tokenizer t = Tokenizer::from_file(test::tiny_checkpoint("llama"));
  return t;
}

DatasetOptions kind(const std::string& k) {
  DatasetOptions o;
  o.kind = k;
  return o;
}

TEST(Dataset, EveryKindParses) {
  test::TempDir tmp;
  test::write_file(tmp / "cls.jsonl",
                   "{\"text\": \"the cat\", \"label\": \"pos\", \"task\": \"sst\"}\n\n"
                   "{\"text\": \"a dog\", \"label\": \"neg\", \"language\": \"en\"}\n"
                   "{\"text\": \"the cat\", \"label\": \"pos\", \"task\": \"nli\"}\n");
  Dataset d = load_jsonl(tmp / "cls.jsonl", tokenizer(), kind("classification"));
  ASSERT_EQ(d.examples.size(), 3u);
  EXPECT_EQ(d.labels, (std::vector<std::string>{"pos", "neg"}));
  EXPECT_EQ(d.examples[1].label, 1);
  EXPECT_EQ(d.examples[1].line, 3);
  EXPECT_EQ(d.examples[1].language, "en");
  EXPECT_EQ(d.tasks, (std::vector<std::string>{"sst", "nli"}));
  EXPECT_EQ(d.examples[0].ids, tokenizer().encode("the cat"));

  test::write_file(tmp / "tag.jsonl", "{\"tokens\": [\"the\", \"cat\"], \"tags\": [\"O\", \"B\"]}\n");
  Dataset t = load_jsonl(tmp / "tag.jsonl", tokenizer(), kind("tagging"));
  const Example& e = t.examples[0];
  ASSERT_EQ(e.ids.size(), e.targets.size());
  EXPECT_EQ(e.targets[0], 0);
  EXPECT_EQ(std::count(e.targets.begin(), e.targets.end(), 1), 1);  // the first piece of "cat" only

  test::write_file(tmp / "ins.jsonl", "{\"prompt\": \"Q: the\", \"completion\": \" cat\"}\n");
  Dataset ins = load_jsonl(tmp / "ins.jsonl", tokenizer(), kind("instruction"));
  const size_t prompt = tokenizer().encode("Q: the").size();
  EXPECT_EQ(ins.examples[0].targets[prompt - 1], -100);
  EXPECT_EQ(ins.examples[0].targets[prompt], ins.examples[0].ids[prompt]);
  DatasetOptions shortened = kind("text");
  shortened.max_length = 2;
  test::write_file(tmp / "txt.jsonl", "{\"text\": \"the cat sat on the mat\"}\n");
  EXPECT_EQ(load_jsonl(tmp / "txt.jsonl", tokenizer(), shortened).examples[0].ids.size(), 2u);
}

TEST(Dataset, BadRecordsNameFileLineAndField) {
  test::TempDir tmp;
  const std::string f = tmp / "bad.jsonl";
  test::write_file(
      f,
      "{\"text\": \"ok\", \"label\": 0}\n{\"text\": \"no label\"}\n{not json\n{\"text\": 3, \"label\": 1}\n");
  const std::string where = "[data] " + f + ":2: missing field 'label'";
  EXPECT_THROW_WITH(load_jsonl(f, tokenizer(), kind("classification")), where.c_str());
  DatasetOptions skip = kind("classification");
  skip.on_bad_record = "skip";
  Dataset d = load_jsonl(f, tokenizer(), skip);
  EXPECT_EQ(d.examples.size(), 1u);
  EXPECT_EQ(d.skipped, 3);
  test::write_file(f, "{not json\n");
  EXPECT_THROW_WITH(load_jsonl(f, tokenizer(), kind("text")), ":1: invalid JSON");
  test::write_file(f, "{\"text\": 3}\n");
  EXPECT_THROW_WITH(load_jsonl(f, tokenizer(), kind("text")),
                    ":1: field 'text' must be a string, found number");
  DatasetOptions fixed = kind("classification");
  fixed.labels = {"a", "b"};
  test::write_file(f, "{\"text\": \"x\", \"label\": \"c\"}\n");
  EXPECT_THROW_WITH(load_jsonl(f, tokenizer(), fixed), "unknown label 'c'");
  EXPECT_THROW_WITH(load_jsonl(tmp / "missing.jsonl", tokenizer(), fixed), "cannot read");
}

TEST(Idx, GzippedImagesAndLabelsRoundTrip) {
  test::TempDir tmp;
  // 2 images of 2x3 bytes, gzipped, as MNIST ships them.
  const unsigned char header[] = {0, 0, 0x08, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3};
  const unsigned char pixels[] = {0, 1, 2, 3, 4, 5, 250, 251, 252, 253, 254, 255};
  gzFile g = gzopen((tmp / "img.gz").c_str(), "wb");
  gzwrite(g, header, sizeof(header));
  gzwrite(g, pixels, sizeof(pixels));
  gzclose(g);
  at::Tensor t = read_idx(tmp / "img.gz");
  EXPECT_EQ(t.sizes(), (at::IntArrayRef{2, 2, 3}));
  EXPECT_EQ(t[1][1][2].item<uint8_t>(), 255);
  // Big-endian int32 labels, uncompressed.
  const unsigned char labels[] = {0, 0, 0x0C, 1, 0, 0, 0, 2, 0, 0, 1, 2, 0xFF, 0xFF, 0xFF, 0xFE};
  test::write_file(tmp / "lab.idx", std::string(reinterpret_cast<const char*>(labels), sizeof(labels)));
  at::Tensor l = read_idx(tmp / "lab.idx");
  EXPECT_EQ(l[0].item<int32_t>(), 258);
  EXPECT_EQ(l[1].item<int32_t>(), -2);
  test::write_file(tmp / "short.idx",
                   std::string(reinterpret_cast<const char*>(header), sizeof(header)) + "abc");
  EXPECT_THROW_WITH(read_idx(tmp / "short.idx"), "data ends after 3 of 12 bytes (shape [2, 2, 3])");
  test::write_file(tmp / "bad.idx", "PK\x03\x04");
  EXPECT_THROW_WITH(read_idx(tmp / "bad.idx"), "does not start with an IDX magic number");
}

TEST(Sampling, ProportionalTemperatureUniform) {
  auto p = task_sampling_probabilities({100, 300}, "proportional");
  EXPECT_DOUBLE_EQ(p[0], 0.25);
  auto t = task_sampling_probabilities({100, 400}, "temperature", 2.0);  // sqrt: 10 vs 20
  EXPECT_NEAR(t[0], 1.0 / 3.0, 1e-12);
  auto u = task_sampling_probabilities({1, 1000}, "uniform");
  EXPECT_DOUBLE_EQ(u[1], 0.5);
  EXPECT_THROW_WITH(task_sampling_probabilities({1, 0}, "uniform"), "every task needs examples");
  EXPECT_THROW_WITH(task_sampling_probabilities({1}, "sqrt"), "kind 'sqrt' is unknown");
}

}  // namespace
}  // namespace mdl
